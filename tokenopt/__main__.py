"""``python -m tokenopt``: the same command line as the ``tokenopt`` console script."""
from tokenopt.cli import main

if __name__ == "__main__":
    main()
