"""Analysis: find the transformer blocks, the token stream, the prefix tokens and the pooling.

Data in, data out: :func:`analyse` traces the model, propagates shapes on an example batch and
returns a :class:`ModelAnalysis` of plain records that name graph nodes. It never mutates the
model. Every attention core that does not become a reducible block carries a written reason.

How a block is recognised (pre-norm ``x + attn(norm(x))`` then ``h + mlp(norm(h))``, and the
post-norm variant):

1. an *attention core*: a fused ``scaled_dot_product_attention`` call, an explicit
   ``softmax(q @ k^T)`` whose result multiplies v, or an ``nn.MultiheadAttention`` leaf;
2. the *attention residual*: the first add after the core whose other operand is an ancestor of
   the core, which is therefore the block input;
3. the *MLP residual*: the first later add that sums a node on the direct chain from the attention
   residual (the residual itself, or its norm in post-norm blocks) with something computed from it,
   with no attention in between. That chain node is the *merge point*: ToMe and ToFu reduce tokens
   there, between attention and MLP.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from tokenopt.errors import AnalysisError
from tokenopt.trace import trace

CLASS_ATTENTION = "class attention"
_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SOFTMAX_FN = {torch.softmax, F.softmax, torch.Tensor.softmax}
_MATMUL_FN = {operator.matmul, torch.matmul, torch.bmm, torch.einsum}
_ADD_FN = {operator.add, torch.add, operator.iadd}
# Ops that pass a tensor through without mixing tokens (used to walk from k^T back to k, etc.).
_PASSTHROUGH_METHODS = {"transpose", "permute", "mul", "div", "contiguous", "to", "float", "type_as", "mT"}


@dataclass
class AttentionCore:
    kind: str                      # "sdpa" | "softmax" | "mha"
    node: str                      # the SDPA call, the softmax, or the MHA call_module
    q: str | None = None
    k: str | None = None           # keys with the token axis at -2, heads split (B, H, N, d) or (B*H, N, d)
    logits: str | None = None      # explicit path: the node feeding softmax (pre-softmax logits)
    heads: int | None = None
    module: str | None = None      # MHA: qualified module name
    v: str | None = None           # values (sdpa, softmax); None for an MHA module
    output: str | None = None      # the node holding the attention result: SDPA call, attn @ v, MHA call


@dataclass
class BlockRecord:
    index: int
    path: str                      # module path, e.g. "blocks.3"
    input: str                     # block input (token stream in)
    attention: AttentionCore
    attn_residual: str             # x + attn(...)
    merge_point: str               # where token reduction goes (between attention and MLP)
    output: str                    # block output (MLP residual, or attn residual if no MLP)
    tokens: int                    # tokens entering the block in the example batch
    dim: int
    refusal: str | None = None     # None: every pass may rewrite it; else why not

    @property
    def grid_bound(self) -> bool:
        """True when the block needs the original token grid, so no earlier block may change it.
        A class-attention block cannot be reduced itself but reads any number of tokens."""
        return self.refusal is not None and not self.refusal.startswith(CLASS_ATTENTION)


@dataclass
class Pooling:
    kind: str                      # "cls" | "avg" | "max" | "tokens"
    node: str | None               # the node that reduces the token axis (None for "tokens")
    start: int = 0                 # avg/max: first token pooled (prefix tokens excluded)
    detail: str = ""


@dataclass
class ModelAnalysis:
    graph: fx.GraphModule
    blocks: list[BlockRecord]
    unmatched: list[tuple[str, str]] = field(default_factory=list)   # (where, reason)
    prefix_tokens: int = 0
    prefix_source: str = ""
    pooling: list[Pooling] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()
    features: str = ""             # last node holding all tokens after the blocks (e.g. final norm)

    @property
    def block_paths(self) -> list[str]:
        return [b.path for b in self.blocks]

    def summary(self) -> str:
        lines = [f"{len(self.blocks)} transformer blocks, {self.prefix_tokens} prefix token(s) "
                 f"({self.prefix_source}), pooling: {', '.join(p.kind for p in self.pooling) or 'none'}"]
        for b in self.blocks:
            status = "ok" if b.refusal is None else f"refused: {b.refusal}"
            lines.append(f"  [{b.index:2d}] {b.path:<24} {b.attention.kind:<7} tokens={b.tokens:<5} {status}")
        for where, why in self.unmatched:
            lines.append(f"  not a block: {where}: {why}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# entry point

def example_input_for(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """An input batch of the size the model expects.

    From ``patch_embed.img_size`` when the model has one; otherwise timm's pretrained_cfg, the
    sizes a plain ViT implies (its first conv's stride times the side of a square
    position-embedding grid) and common sizes, each tried with one forward pass until one runs.
    """
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else "cpu"
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = conv.in_channels if conv is not None else 3
    candidates = []
    if img is not None:
        img = tuple(img) if isinstance(img, (tuple, list)) else (img, img)
        candidates.append((chans, *img))
    else:
        # timm leaves pretrained_cfg at the default size when a model is built with another
        # img_size (LeViT, Hiera, GC ViT ...): the config is the first guess, not the answer
        if "input_size" in cfg:
            candidates.append(tuple(cfg["input_size"]))
        stride = conv.stride[0] if conv is not None else 16
        for name, t in model.named_parameters():
            if t.dim() == 3 and t.shape[0] == 1 and "pos" in name.lower():
                for prefix in range(0, 9):
                    side = math.isqrt(max(t.shape[1] - prefix, 0))
                    if side and side * side == t.shape[1] - prefix:
                        candidates.append((chans, side * stride, side * stride))
        candidates += [(chans, s, s) for s in (224, 32, 64, 96, 128, 256, 384)]
    gen = torch.Generator().manual_seed(0)
    if len(candidates) > 1:
        for size in dict.fromkeys(candidates):
            try:
                with torch.no_grad():
                    model(torch.randn(1, *size, generator=gen).to(device, dtype))
            except Exception:
                continue
            return torch.randn(batch, *size, generator=gen).to(device, dtype)
    return torch.randn(batch, *candidates[0], generator=gen).to(device, dtype)


def analyse(model: nn.Module, example_input: torch.Tensor | None = None, leaf_modules=(),
            prefix_tokens: int | None = None) -> ModelAnalysis:
    """Trace ``model`` and describe its blocks. Raises AnalysisError when there are none."""
    gm = trace(model, leaf_modules)
    if example_input is None:
        example_input = example_input_for(model)
    with torch.no_grad():
        try:
            _ShapeRecorder(gm).run(example_input)
        except Exception as e:
            cause = e.__cause__ or e
            raise AnalysisError(
                f"running {type(model).__name__} on an example batch of shape {tuple(example_input.shape)} failed: "
                f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}\n"
                "  Pass an input of the size the model expects (API: example_input=...; CLI: --input-size C,H,W).") from None
    return _Analyser(gm, model, prefix_tokens).run(tuple(example_input.shape))


class _ShapeRecorder(fx.Interpreter):
    """Records each tensor node's shape and dtype in ``node.meta["tensor_meta"]`` (like ShapeProp,
    which also prints a traceback on failure; here the caller turns failures into one message)."""

    def run_node(self, n):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        return result


# ----------------------------------------------------------------------------------------------
# helpers on nodes

def shape_of(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _ADD_FN) or (n.op == "call_method" and n.target in ("add", "add_"))


def is_matmul(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _MATMUL_FN) or (n.op == "call_method" and n.target in ("matmul", "bmm"))


def is_softmax(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _SOFTMAX_FN) or (n.op == "call_method" and n.target == "softmax")


def tensor_args(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if shape_of(a) is not None or a.op == "get_attr"]


def module_path(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        key = list(stack.keys())[-1]
        val = stack[key]
        # fx stores {key: (qualname, type)} in recent torch; older versions {qualname: type}
        return val[0] if isinstance(val, tuple) else key
    if n.op == "call_module":
        return n.target
    if n.op == "get_attr":
        return n.target.rsplit(".", 1)[0] if "." in n.target else ""
    return ""


def common_module_prefix(paths: list[str]) -> str:
    split = [p.split(".") for p in paths if p is not None]
    if not split:
        return ""
    out = []
    for parts in zip(*split):
        if all(p == parts[0] for p in parts):
            out.append(parts[0])
        else:
            break
    return ".".join(out)


class _Analyser:
    def __init__(self, gm: fx.GraphModule, model: nn.Module, prefix_override: int | None):
        self.gm = gm
        self.model = model
        self.prefix_override = prefix_override
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.G = nx.DiGraph()
        for n in self.nodes:
            self.G.add_node(n)
            for a in n.all_input_nodes:
                self.G.add_edge(a, n)
        self._anc: dict = {}
        self._desc: dict = {}

    # cached reachability: graphs are a few thousand nodes at most
    def anc(self, n):
        if n not in self._anc:
            self._anc[n] = nx.ancestors(self.G, n)
        return self._anc[n]

    def desc(self, n):
        if n not in self._desc:
            self._desc[n] = nx.descendants(self.G, n)
        return self._desc[n]

    def image_input(self):
        return next(n for n in self.nodes if n.op == "placeholder")

    # ------------------------------------------------------------------ cores
    def find_cores(self) -> tuple[list[AttentionCore], list[tuple[str, str]]]:
        cores, rejected = [], []
        for n in self.nodes:
            if n.op == "call_function" and n.target in _SDPA:
                q, k = (n.args + (None, None))[:2]
                q = q if q is not None else n.kwargs.get("query")
                k = k if k is not None else n.kwargs.get("key")
                v = n.args[2] if len(n.args) > 2 else n.kwargs.get("value")
                sq = shape_of(q)
                cores.append(AttentionCore("sdpa", n.name, q=q.name, k=k.name,
                                           heads=sq[1] if sq and len(sq) == 4 else None,
                                           v=v.name if isinstance(v, fx.Node) else None, output=n.name))
            elif n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), nn.MultiheadAttention):
                mod = self.gm.get_submodule(n.target)
                cores.append(AttentionCore("mha", n.name, heads=mod.num_heads, module=n.target, output=n.name))
            elif is_softmax(n) or self._is_softmax_module(n):
                core = self._explicit_core(n)
                if isinstance(core, AttentionCore):
                    cores.append(core)
                elif core is not None:
                    rejected.append((n.name, core))
        return cores, rejected

    def _explicit_core(self, sm: fx.Node):
        """softmax(q @ k^T ...) @ v  ->  AttentionCore, a reason string, or None (not attention)."""
        # the softmax result must reach the left operand of a matmul through a short chain of
        # same-size ops (dropout; CaiT's talking heads: permute, linear over heads, permute)
        numel = math.prod(shape_of(sm) or (0,))
        nxt, steps = sm, 0
        while nxt is not None and not is_matmul(nxt) and steps < 6:
            users = list(nxt.users)
            ok = len(users) == 1 and (is_matmul(users[0]) or math.prod(shape_of(users[0]) or (-1,)) == numel)
            nxt = users[0] if ok else None
            steps += 1
        if nxt is None or not is_matmul(nxt):
            return None
        # walk back from the softmax input to the q @ k^T matmul, through scale, mask, bias adds
        # and head-mixing ops of the same size
        logits = sm.args[0]
        cur = logits
        seen = 0
        while cur is not None and not is_matmul(cur) and seen < 8:
            cur = next((a for a in cur.all_input_nodes if shape_of(a) is not None and
                        math.prod(shape_of(a)) == numel and a.op != "get_attr"), None)
            seen += 1
        if cur is None or not is_matmul(cur) or len(cur.args) < 2:
            return "softmax does not follow a q @ k^T product"
        q, kt = cur.args[0], cur.args[1]
        k = kt
        while isinstance(k, fx.Node) and k.op in ("call_method", "call_function") and (
                (k.op == "call_method" and k.target in _PASSTHROUGH_METHODS) or
                (k.op == "call_function" and getattr(k.target, "__name__", "") in ("transpose", "permute", "mul", "truediv"))):
            sk = shape_of(k)
            if sk is not None and shape_of(logits) is not None and sk[-2] == shape_of(logits)[-1] and k is not kt:
                break
            k = k.args[0]
        sk = shape_of(k)
        if sk is None or sk[-2] != shape_of(logits)[-1]:
            return "cannot find the keys of the q @ k^T product"
        sl = shape_of(logits)
        v = nxt.args[1] if len(nxt.args) > 1 and isinstance(nxt.args[1], fx.Node) else None
        return AttentionCore("softmax", sm.name, q=q.name, k=k.name, logits=logits.name,
                             heads=sl[1] if len(sl) == 4 else None, v=v.name if v is not None else None,
                             output=nxt.name)

    # ------------------------------------------------------------------ blocks
    def run(self, input_shape) -> ModelAnalysis:
        cores, unmatched = self.find_cores()
        blocks: list[BlockRecord] = []
        for core in cores:
            rec = self._block_for(core, len(blocks))
            if isinstance(rec, str):
                unmatched.append((f"{self._where(core)}", rec))
            else:
                blocks.append(rec)
        if not blocks:
            why = "; ".join(f"{w}: {r}" for w, r in unmatched) or "no attention (SDPA, softmax(q@k^T)@v or nn.MultiheadAttention) in the graph"
            raise AnalysisError(
                f"{type(self.model).__name__} has no transformer blocks tokenopt can find ({why}).\n"
                "  tokenopt rewrites Vision Transformers: blocks of the form x + attn(norm(x)), then + mlp(norm(x)). "
                "If your attention lives in a module fx cannot see into, do not mark it as a leaf.")
        prefix, source = self._prefix_tokens(blocks)
        for b in blocks:
            if b.refusal is None:
                b.refusal = self._positional_refusal(b, prefix)
        pooling, features = self._pooling(blocks[-1], prefix)
        return ModelAnalysis(self.gm, blocks, unmatched, prefix, source, pooling, input_shape, features)

    def _where(self, core: AttentionCore) -> str:
        n = self._node(core.node)
        return module_path(n) or core.node

    def _node(self, name: str) -> fx.Node:
        return next(n for n in self.nodes if n.name == name)

    def _core_inputs(self, core: AttentionCore) -> list[fx.Node]:
        n = self._node(core.node)
        if core.kind == "mha":
            return [a for a in n.args[:3] if isinstance(a, fx.Node)]
        return [self._node(core.q), self._node(core.k)]

    def _block_for(self, core: AttentionCore, index: int):
        c = self._node(core.node)
        after_core = self.desc(c) | {c}
        before_core = self.anc(c)
        r1 = skip = None
        for n in self.nodes[self.order[c] + 1:]:
            if not is_add(n) or n not in after_core:
                continue
            ops = [a for a in n.args[:2] if isinstance(a, fx.Node)]
            if len(ops) != 2:
                continue
            a, b = ops
            if a in before_core and b in after_core:
                r1, skip = n, a
                break
            if b in before_core and a in after_core:
                r1, skip = n, b
                break
        if r1 is None:
            return "no residual add around the attention (x + attn(x))"
        x_shape = shape_of(skip)
        # the direct chain from r1: r1, then single-user non-add nodes (post-norm puts a norm here)
        chain = [r1]
        while len(chain[-1].users) == 1:
            u = next(iter(chain[-1].users))
            if is_add(u) or shape_of(u) != shape_of(r1):
                break
            chain.append(u)
        r2 = merge = None
        for n in self.nodes[self.order[r1] + 1:]:
            if not is_add(n):
                continue
            ops = [a for a in n.args[:2] if isinstance(a, fx.Node)]
            if len(ops) != 2:
                continue
            for s, o in (ops, ops[::-1]):
                if s in chain and (o in self.desc(s)):
                    r2, merge = n, s
                    break
            if r2 is not None:
                break
            if n in self.desc(r1) and any(self._is_core_node(m) for m in self.anc(n) - self.anc(r1) - {r1}):
                break  # reached the next block's attention: this block has no MLP
        if r2 is not None and any(self._is_core_node(m) for m in (self.anc(r2) & self.desc(merge))):
            r2 = None
        if r2 is None:
            merge, r2 = chain[-1], chain[-1]
        nodes = [c, r1, r2]
        path = common_module_prefix([module_path(n) for n in nodes]) or f"block{index}"
        refusal = None
        if x_shape is None or len(x_shape) != 3:
            refusal = (f"the token stream is not (batch, tokens, channels) but {x_shape}: "
                       "a 2-D token grid (windowed attention, as in Swin) cannot lose tokens")
        tokens = x_shape[1] if x_shape and len(x_shape) == 3 else (math.prod(x_shape[1:-1]) if x_shape else 0)
        dim = x_shape[-1] if x_shape else 0
        rec = BlockRecord(index, path, skip.name, core, r1.name, merge.name, r2.name, tokens, dim, refusal)
        if rec.refusal is None:
            rec.refusal = self._shape_refusal(rec)
        return rec

    def _is_softmax_module(self, n) -> bool:
        return n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), nn.Softmax)

    def _is_core_node(self, n) -> bool:
        return (n.op == "call_function" and n.target in _SDPA) or is_softmax(n) or self._is_softmax_module(n) or (
            n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), nn.MultiheadAttention))

    # ------------------------------------------------------------------ refusals
    def _shape_refusal(self, b: BlockRecord) -> str | None:
        core = b.attention
        x = shape_of(self._node(b.input))
        if core.kind == "mha":
            mod = self.gm.get_submodule(core.module)
            if not mod.batch_first:
                return "nn.MultiheadAttention with batch_first=False keeps tokens on axis 0; tokenopt needs (batch, tokens, channels)"
            n = self._node(core.node)
            if not (n.args[0] is n.args[1] is n.args[2]) and len(n.args) >= 3:
                return "cross-attention (query, key and value differ): not a self-attention block"
            return None
        q, k = shape_of(self._node(core.q)), shape_of(self._node(core.k))
        if q is None or k is None:
            return "cannot read the shapes of q and k"
        if q[0] != x[0]:
            return (f"windowed attention: attention runs over {q[0] // max(x[0], 1)} fixed windows per image "
                    "(batch of q is batch x windows); removing tokens breaks the window partition")
        if q[-2] != b.tokens and q[-1] == b.tokens:
            return ("cross-covariance attention (XCiT): attention runs over channels, and the block's local "
                    "patch interaction convolves the token grid")
        if k[-2] > q[-2] or (q[-2] < b.tokens and k[-2] == b.tokens):
            return (f"{CLASS_ATTENTION}: {q[-2]} class token quer{'y reads' if q[-2] == 1 else 'ies read'} "
                    f"{k[-2]} tokens as keys; only the class token is updated, there is nothing to reduce here")
        if q[-2] != b.tokens:
            return f"attention sees {q[-2]} queries but the block has {b.tokens} tokens (windowed or pooled attention)"
        if k[-2] < q[-2]:
            return (f"spatial-reduction attention: keys come from a downsampled grid ({k[-2]} keys for {q[-2]} queries)")
        return None

    def _positional_refusal(self, b: BlockRecord, prefix: int) -> str | None:
        """Position-dependent terms tied to a fixed token grid: relative-position bias and RoPE."""
        core = b.attention
        if core.kind == "mha":
            return None
        x_in = self._node(b.input)
        inside = self.desc(x_in)
        c = self._node(core.node)
        n_tok = b.tokens
        grid_sizes = {n_tok, n_tok - prefix}

        def fixed_operand(op_node):
            # an operand not computed from the tokens, carrying a token-sized axis
            for a in op_node.all_input_nodes:
                sa = shape_of(a)
                if a in inside or a is x_in or sa is None or len(sa) < 2:
                    continue
                if any(s in grid_sizes and s > 1 for s in sa[-3:]):
                    return a
            return None

        # additive terms on the logits: attn_mask of SDPA, or adds between q@k^T and softmax
        if core.kind == "sdpa":
            mask = c.kwargs.get("attn_mask", c.args[3] if len(c.args) > 3 else None)
            if isinstance(mask, fx.Node) and mask.op != "placeholder" and shape_of(mask) is not None:
                names = " ".join(a.target for a in self.anc(mask) | {mask} if a.op == "get_attr")
                if "relative" in names or "rel_pos" in names or shape_of(mask)[-1] in grid_sizes:
                    return "relative-position bias: an attention bias indexed by a fixed N x N token grid (as in BEiT)"
        else:
            lg = self._node(core.logits)
            for m in (self.anc(lg) | {lg}) - self.anc(self._node(core.k)):
                if is_add(m) and m in inside and fixed_operand(m) is not None:
                    return "relative-position bias: an attention bias indexed by a fixed N x N token grid (as in BEiT)"
        # rotary embeddings: q/k multiplied by position-dependent sin/cos
        for qk in (core.q, core.k):
            qn = self._node(qk)
            path = (self.anc(qn) | {qn}) & inside
            for m in path:
                if m.op in ("call_function", "call_method") and fixed_operand(m) is not None:
                    return ("rotary position embedding (RoPE): q and k are rotated by position-dependent "
                            "sin/cos tables tied to the original token grid")
        return None

    # ------------------------------------------------------------------ prefix tokens
    def _prefix_tokens(self, blocks: list[BlockRecord]) -> tuple[int, str]:
        if self.prefix_override is not None:
            return self.prefix_override, "set by the recipe"
        n = getattr(self.model, "num_prefix_tokens", None)
        patches = getattr(getattr(self.model, "patch_embed", None), "num_patches", None)
        if isinstance(n, int) and n and patches == blocks[0].tokens:
            # e.g. CaiT: the class token joins only in the class-attention blocks at the end
            return 0, "the blocks see only patch tokens"
        if isinstance(n, int):
            return n, "model.num_prefix_tokens"
        # graph: a cat along the token axis before the first block, of tensors not computed
        # from the image (learned cls/dist/register tokens) in front of the patch tokens
        first_in = self._node(blocks[0].input)
        img = self.image_input()
        from_image = self.desc(img)
        for m in sorted(self.anc(first_in) | {first_in}, key=self.order.get):
            if m.op == "call_function" and m.target is torch.cat:
                parts = m.args[0] if m.args else m.kwargs.get("tensors")
                dim = m.kwargs.get("dim", m.args[1] if len(m.args) > 1 else 0)
                if not isinstance(parts, (list, tuple)) or dim not in (1, -2):
                    continue
                count = 0
                for p in parts:
                    if self._tensor_from_image(p, img):
                        return count, "learned tokens concatenated before the patch tokens"
                    sp = shape_of(p)
                    count += sp[1] if sp else 0
        return 0, "none found"

    def _tensor_from_image(self, p: fx.Node, img: fx.Node) -> bool:
        # follow tensor-valued inputs only: cls.expand(x.shape[0], ...) reads the image's *shape*
        stack, seen = [p], set()
        while stack:
            n = stack.pop()
            if n is img:
                return True
            if n in seen:
                continue
            seen.add(n)
            stack.extend(a for a in n.all_input_nodes if a is img or shape_of(a) is not None)
        return False

    # ------------------------------------------------------------------ pooling
    def _pooling(self, last: BlockRecord, prefix: int) -> tuple[list[Pooling], str]:
        out = self._node(last.output)
        features = out
        n_tok = last.tokens
        pools: list[Pooling] = []
        frontier, seen = [(out, 0)], set()
        while frontier:
            n, start = frontier.pop()
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                su = shape_of(u)
                if u.op == "output":
                    pools.append(Pooling("tokens", None, detail="the model returns all tokens"))
                elif u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], tuple) \
                        and len(u.args[1]) >= 2 and u.args[1][0] == slice(None):
                    idx = u.args[1][1]
                    if isinstance(idx, int):
                        pools.append(Pooling("cls", u.name, detail=f"token {idx}"))
                    elif isinstance(idx, slice):
                        frontier.append((u, (idx.start or 0)))
                    else:
                        pools.append(Pooling("tokens", u.name, detail=f"indexes tokens with {idx!r}"))
                elif (u.op == "call_method" and u.target in ("mean", "sum", "amax", "max")) or (
                        u.op == "call_function" and u.target in (torch.mean, torch.sum, torch.amax, torch.max)):
                    dim = u.kwargs.get("dim", u.args[1] if len(u.args) > 1 else None)
                    if dim in (1, -2, (1,), [1]):
                        kind = "avg" if u.target in ("mean", torch.mean, "sum", torch.sum) else "max"
                        pools.append(Pooling(kind, u.name, start=start, detail=f"{u.target if isinstance(u.target, str) else u.target.__name__} over tokens"))
                    else:
                        pools.append(Pooling("tokens", u.name, detail="reduces over channels, keeps tokens"))
                elif su is not None and len(su) == 3 and su[1] in (n_tok, n_tok - start) and self._token_wise(u):
                    frontier.append((u, start))
                    if start == 0 and self.order[u] > self.order[features]:
                        features = u
                else:
                    pools.append(Pooling("tokens", u.name, detail=f"{u.op} {u.target} consumes every token"))
        return pools, features.name

    def _token_wise(self, u: fx.Node) -> bool:
        if u.op == "call_module":
            mod = self.gm.get_submodule(u.target)
            return isinstance(mod, (nn.LayerNorm, nn.Linear, nn.Dropout, nn.Identity, nn.GELU)) or \
                type(mod).__name__ in ("LayerNorm", "RmsNorm", "Identity", "Dropout")
        if u.op == "call_function":
            return u.target in (F.layer_norm, F.linear, F.gelu, F.dropout, operator.mul, operator.add) or \
                getattr(u.target, "__name__", "") in ("layer_norm", "rms_norm", "gelu", "dropout")
        return u.op == "call_method" and u.target in ("contiguous", "to", "float")
