"""Tensor code inserted into rewritten graphs.

Plain torch functions: traceable by fx (they are inserted as ``call_function`` nodes and stay
opaque to the analysis), compilable by ``torch.compile`` without graph breaks, with static shapes
wherever the recipe fixes the token counts. Each has one job; node names in the rewritten graph
come from the function names so the printed graph reads like the method.
"""
