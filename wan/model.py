"""The Wan 2.1 diffusion transformer (DiT).

Parameter names are the official checkpoint keys, so `diffusion_pytorch_model*.safetensors` loads
unchanged. Shapes below use B batch, C_in/C_out latent channels, F/H/W latent frames/rows/columns,
L = F*H*W/4 tokens, C model width, N heads, D head width, Lc context tokens.

Numerics follow the official code, which keeps float32 weights and runs under bf16 autocast with float32
regions: the time embedding and projection, the modulation arithmetic, the residual stream, every norm (with
its weights) and the whole head (norm, modulation and output projection) are float32; the other linear
layers, the patch embedding and attention run in the model's dtype (bf16 on a GPU). `WanModel.cast` keeps
exactly those weights in float32 (`WanModel.keeps_fp32`).
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol

import torch
from torch import nn

from wan.attention import AttentionOp, attention, resolve_attention
from wan.configs import DiTConfig
from wan.rope import apply_rope, rope_frequencies

__all__ = ["SequenceSharding", "WanModel", "sinusoidal_embedding"]

_COMPILE_WITH_CONTEXT_PARALLEL = (
    "torch.compile cannot be combined with context parallelism (Ulysses / ring): the sequence-sharded "
    "self-attention (all-to-all, ring send/receive, padding arithmetic) breaks every compiled block's "
    "graph; compile on one process, or run the parallel layout without compiling"
)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep embedding, cos half first, computed in float64. t: [B] -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


class SequenceSharding(Protocol):
    """An optional hook that splits the token sequence over processes (set as `WanModel.sequence_sharding`).

    The model calls `shard` after patch embedding, runs every block on the local tokens with the returned
    self-attention op (which must see the whole sequence), applies the head per token and calls `gather`
    before unpatchify. Cross-attention and the time modulation stay local. The model knows nothing else.
    """

    def shard(
        self, tokens: torch.Tensor, rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionOp]:
        """tokens: [B, L, C]; rope: complex [L, D/2] (global positions) -> (tokens [B, Ll, C], rope [Ll, D/2],
        the self-attention op for this forward: local q, k, v [B, Ll, N, D] -> [B, Ll, N, D])."""
        ...

    def gather(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """tokens: [B, Ll, P] local rows -> [B, length, P], the whole sequence in order."""
        ...


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension, then a learned scale.

    x: [..., C] -> [..., C]. As the official `WanRMSNorm` under autocast: normalised in float32, rounded to
    x's dtype, then multiplied by the weight, so a float32 weight (as `WanModel.cast` keeps it) gives a
    float32 result, rounded only where attention takes it.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (with float32 weights) whatever the input dtype; x: [..., C] -> [..., C]
    in x's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class SelfAttention(nn.Module):
    """Self-attention with q/k RMSNorm over the full width and 3-D RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        attn_op: AttentionOp | None = None,
        kernel: AttentionOp | None = None,
    ) -> torch.Tensor:
        """x: [B, L, C] in the compute dtype; rope: [L, D/2] complex rotations or their real view
        [L, D/2, 2] -> [B, L, C].

        `attn_op` replaces the attention for this call (a sequence-sharded forward passes its own); else
        `kernel`, the resolved attention function (`wan.attention.resolve_attention`); None: `attention`
        chooses at the call (eager use only: under `torch.compile` pass a resolved kernel). q and k leave
        the float32 norms and RoPE and are rounded to v's dtype for the attention, as officially.
        """
        heads = (self.num_heads, -1)
        v = self.v(x).unflatten(-1, heads)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads), rope).to(v.dtype)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, heads), rope).to(v.dtype)
        op = attn_op if attn_op is not None else kernel if kernel is not None else attention
        return self.o(op(q, k, v).flatten(2))


class CrossAttention(nn.Module):
    """Cross-attention from the video tokens to the text context (no mask, no RoPE).

    With `image_dim` set (image-to-video), the context starts with image tokens that get their own
    keys and values (`k_img`, `v_img`, `norm_k_img`); both attention outputs are summed before `o`.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, text_len: int, with_image: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.text_len = text_len
        self.with_image = with_image
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        if with_image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, kernel: AttentionOp | None = None
    ) -> torch.Tensor:
        """x: [B, L, C]; context: [B, Lc, C] (image tokens first, then text_len text tokens), both in the
        compute dtype -> [B, L, C]. `kernel`: as in `SelfAttention.forward`.

        q and k leave their float32 norms rounded to v's dtype; with image tokens the two attention outputs
        are summed in float32 (the official kernels return float32 for float32 queries) before `o`.
        """
        heads = (self.num_heads, -1)
        op = attention if kernel is None else kernel
        text = context[:, -self.text_len :] if self.with_image else context
        v = self.v(text).unflatten(-1, heads)
        q = self.norm_q(self.q(x)).unflatten(-1, heads).to(v.dtype)
        k = self.norm_k(self.k(text)).unflatten(-1, heads).to(v.dtype)
        out = op(q, k, v)
        if self.with_image:
            image = context[:, : -self.text_len]
            v_img = self.v_img(image).unflatten(-1, heads)
            k_img = self.norm_k_img(self.k_img(image)).unflatten(-1, heads).to(v_img.dtype)
            out = (out.float() + op(q, k_img, v_img).float()).to(v.dtype)
        return self.o(out.flatten(2))


class AttentionBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated feed-forward.

    `norm3` (affine) is the cross-attention pre-norm and `norm2` (no parameters) the FFN pre-norm,
    as in the official checkpoints. `modulation` [1, 6, C] is this block's learned bias on top of the
    shared time projection: shift/scale/gate for self-attention, then for the FFN.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, cfg.text_len, cfg.image_dim is not None)
        self.norm2 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / math.sqrt(dim))

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        rope: torch.Tensor,
        attn_op: AttentionOp | None = None,
        kernel: AttentionOp | None = None,
    ) -> torch.Tensor:
        """x: [B, L, C] float32 residual stream; e0: [B, 6, C] float32; context: [B, Lc, C] in the compute
        dtype; rope: [L, D/2, 2] (cos, sin) or complex [L, D/2] -> [B, L, C] float32.

        `attn_op`: the self-attention op for this call (a sequence-sharded forward's), else `kernel`;
        `kernel`: the resolved attention function (`wan.attention.resolve_attention`) for self- and
        cross-attention. Pass it when compiling: with None each attention chooses its kernel at the call
        (environment, imports, device queries), which `torch.compile` would trace into every block.
        """
        dtype = self.ffn[0].weight.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).chunk(6, dim=1)
        y = self.self_attn((self.norm1(x) * (1 + scale1) + shift1).to(dtype), rope, attn_op, kernel)
        x = x + y.float() * gate1
        x = x + self.cross_attn(self.norm3(x).to(dtype), context, kernel).float()
        y = self.ffn((self.norm2(x) * (1 + scale2) + shift2).to(dtype))
        return x + y.float() * gate2


class Head(nn.Module):
    """Output head: LayerNorm, time modulation with its own [1, 2, C] table, linear to patch values.

    All of it runs in float32, the output projection included (`WanModel.cast` keeps the head float32), as
    the official head under its float32 autocast region.
    """

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / math.sqrt(dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, L, C] float32; e: [B, C] float32 (time embedding, not its projection) -> [B, L, P] in the
        head's dtype (float32 unless the whole model was cast without `WanModel.cast`)."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        y = self.norm(x) * (1 + scale) + shift
        return self.head(y.to(self.head.weight.dtype))


class ImageEmbedding(nn.Module):
    """Projects CLIP image features into the context width: LN, Linear, GELU, Linear, LN (`img_emb.proj`).

    First-last-frame-to-video adds a learned position embedding `emb_pos` [1, Lp, image_dim] (official
    Lp = 2 x 257 = 514) to the features of both frames, laid end to end, before the projection.
    As under the official bf16 autocast, the features enter in float32 (CLIP's fp16 output is not rounded to
    bf16), `emb_pos` is added and both LayerNorms (eps 1e-5, affine, float32 weights) run in float32; the two
    linear layers and the GELU run in the linear layers' dtype.
    """

    def __init__(self, image_dim: int, dim: int, pos_tokens: int | None = None) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            LayerNorm(image_dim),
            nn.Linear(image_dim, image_dim),
            nn.GELU(),
            nn.Linear(image_dim, dim),
            LayerNorm(dim),
        )
        self.emb_pos = nn.Parameter(torch.zeros(1, pos_tokens, image_dim)) if pos_tokens else None

    def forward(self, clip_features: torch.Tensor) -> torch.Tensor:
        """clip_features: [B, Li, image_dim] -> [B, Li, C].

        With `emb_pos` (FLF2V, Lp tokens) the input is either [B, Lp, image_dim] (first frame's tokens,
        then the last frame's) or, as the official code and diffusers pass it, [2B, Lp/2, image_dim]
        with each sample's two frames adjacent (first_0, last_0, first_1, last_1, ...), which is viewed
        as [B, Lp, image_dim]. Returns [B, Lp, C].
        """
        if self.emb_pos is not None:
            lp = self.emb_pos.shape[1]
            n, li, c = clip_features.shape
            if li * 2 == lp and n % 2 == 0:
                clip_features = clip_features.reshape(n // 2, lp, c)
            elif li != lp:
                raise ValueError(
                    f"first-last-frame image features must be [B, {lp}, {c}] or [2B, {lp // 2}, {c}] "
                    f"(both frames), got {tuple(clip_features.shape)}"
                )
            clip_features = clip_features.float() + self.emb_pos.float()
        norm_in, fc1, act, fc2, norm_out = self.proj
        x = norm_in(clip_features.float()).to(fc1.weight.dtype)
        return norm_out(fc2(act(fc1(x))))  # computed in float32, returned in the linear layers' dtype


class WanModel(nn.Module):
    """The DiT: patchify, text and time conditioning, `num_layers` blocks, head, unpatchify.

    Precision: `cast(dtype)` runs the model in `dtype` but keeps in float32 what the official code computes
    in float32 (its weights are float32 and its autocast leaves these parts out of bf16):
    `FP32_MODULES`, whole top-level modules (the time embedding and projection, and the head: its output
    projection runs in a float32 autocast region); `FP32_SUFFIXES`, parameters by name (the blocks' and the
    head's modulation tables, FLF2V's image position embedding); `FP32_NORMS`, the weights and biases of
    every normalisation (`norm3`, the q/k RMSNorms, the image projection's LayerNorms), which the official
    norms apply in float32.
    """

    FP32_MODULES: ClassVar[tuple[str, ...]] = ("time_embedding", "time_projection", "head")
    FP32_SUFFIXES: ClassVar[tuple[str, ...]] = ("modulation", "emb_pos")
    FP32_NORMS: ClassVar[tuple[type[nn.Module], ...]] = (RMSNorm, nn.LayerNorm)

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(AttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)
        if cfg.image_dim is not None:
            self.img_emb = ImageEmbedding(cfg.image_dim, dim, cfg.image_tokens)
        # Optional: splits the token sequence over processes (`wan.distributed.apply_context_parallel`).
        self._sequence_sharding: SequenceSharding | None = None
        # The RoPE rotations of the last token grid and device (`rope`): every sampling step reuses them.
        self._rope_key: tuple[tuple[int, ...], torch.device] | None = None
        self._rope: torch.Tensor | None = None

    def keeps_fp32(self, name: str) -> bool:
        """Whether the parameter `name` (as `named_parameters` gives it) stays float32 under `cast`."""
        if name.split(".")[0] in self.FP32_MODULES or name.endswith(self.FP32_SUFFIXES):
            return True
        return isinstance(self.get_submodule(name.rpartition(".")[0]), self.FP32_NORMS)

    @property
    def sequence_sharding(self) -> SequenceSharding | None:
        """The hook that splits the token sequence over processes (None: the whole sequence here)."""
        return self._sequence_sharding

    @sequence_sharding.setter
    def sequence_sharding(self, value: SequenceSharding | None) -> None:
        if value is not None and self.compiled_blocks:
            raise ValueError(_COMPILE_WITH_CONTEXT_PARALLEL)
        self._sequence_sharding = value

    @property
    def compiled_blocks(self) -> bool:
        """Whether any block runs under `torch.compile` (`compile_blocks`, or `block.compile()`)."""
        return any(getattr(block, "_compiled_call_impl", None) is not None for block in self.blocks)

    def cast(self, dtype: torch.dtype) -> WanModel:
        """Run in `dtype`, the `keeps_fp32` parameters staying float32 (in place; returns the model).

        Those parameters never pass through `dtype`, so casting a model that is already mixed (a second
        pipeline around the same model) leaves them exactly as they were.
        """
        if dtype == torch.float32:
            return self.float()
        kept = {
            name: param.detach().float().clone()
            for name, param in self.named_parameters() if self.keeps_fp32(name)
        }  # fmt: skip
        self.to(dtype)
        for name, param in self.named_parameters():
            if name in kept:
                param.data = kept[name]
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """RoPE rotations for a token grid, complex64 [f*h*w, D/2]; kept for the next call (every
        sampling step uses the same grid), so they are computed and copied to the device once."""
        key = (tuple(grid), device)
        if self._rope is None or self._rope_key != key:
            self._rope_key = key
            self._rope = rope_frequencies(key[0], self.cfg.head_dim, device=device)
        return self._rope

    def embed_context(self, text: torch.Tensor, clip_features: torch.Tensor | None = None) -> torch.Tensor:
        """text: [B, Lt, text_dim] (zero-padded T5 output; image models need Lt = text_len);
        clip_features: [B or 1, Li, image_dim] (see `ImageEmbedding` for FLF2V's two frames), required by
        image-to-video models and refused by text-to-video ones; a batch of 1 is shared by all B samples.

        Returns the cross-attention context [B, Li + Lt, C], image tokens first (text only: [B, Lt, C]).
        """
        context = self.text_embedding(text.to(self.dtype))
        if not hasattr(self, "img_emb"):
            if clip_features is not None:
                raise ValueError("this model is text-to-video: it takes no image features")
            return context
        if clip_features is None:
            raise ValueError(f"this model is {self.cfg.model_type}: it needs CLIP image features")
        if text.shape[1] != self.cfg.text_len:
            # the cross-attention tells image from text tokens by the text length
            raise ValueError(
                f"text features must be padded to {self.cfg.text_len} tokens, got {text.shape[1]}"
            )
        image = self.img_emb(clip_features)  # float32 in, as officially; returns the model's dtype
        if image.shape[0] == 1 and context.shape[0] != 1:
            image = image.expand(context.shape[0], -1, -1)
        elif image.shape[0] != context.shape[0]:
            raise ValueError(
                f"{image.shape[0]} image feature sets for a batch of {context.shape[0]} text contexts"
            )
        return torch.cat([image, context], dim=1)

    def compile_blocks(self, **options: object) -> WanModel:
        """`torch.compile` every block in place (`nn.Module.compile`: parameter names and the state dict are
        unchanged); `options` go to `torch.compile` (e.g. `mode="max-autotune"`, `backend="eager"`). The
        first forward of each new shape compiles. Returns the model.

        The attention kernel is chosen before the blocks run and handed to them, so a block compiles to one
        graph. Refused (ValueError) under context parallelism (`sequence_sharding` set), whose
        self-attention (all-to-all, ring send/receive) the compiler cannot take whole."""
        if self.sequence_sharding is not None:
            raise ValueError(_COMPILE_WITH_CONTEXT_PARALLEL)
        for block in self.blocks:
            block.compile(**options)
        return self

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        x: [B, C_in, F, H, W] latents (image-to-video: noise, mask and condition latents concatenated);
        t: [B] timesteps (sigma * 1000); context: [B, text_len, text_dim] zero-padded text features;
        clip_features: [B, Li, image_dim] CLIP features (penultimate layer, 257 tokens per image) for
        image-to-video, [B, 2*257, image_dim] or [2B, 257, image_dim] for first-last-frame-to-video
        (see `embed_context`), None for text-to-video. Returns [B, C_out, F, H, W] in float32.
        """
        if x.ndim != 5 or x.shape[1] != self.cfg.in_dim:
            raise ValueError(f"latents must be [B, {self.cfg.in_dim}, F, H, W], got {tuple(x.shape)}")
        pt, ph, pw = self.cfg.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(
                f"latent size {tuple(x.shape[2:])} is not divisible by the patch {self.cfg.patch_size}"
            )
        tokens = self.patch_embedding(x.to(self.dtype))  # [B, C, f, h, w]
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2).float()  # [B, L, C]
        rope = self.rope(grid, x.device)

        e = self.time_embedding(
            sinusoidal_embedding(t, self.cfg.freq_dim).to(self.time_embedding[0].weight.dtype)
        )
        e = e.float()
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float().unflatten(1, (6, -1))
        ctx = self.embed_context(context, clip_features)

        sharding = self.sequence_sharding
        length = tokens.shape[1]
        attn_op = None
        if sharding is not None:  # local tokens [B, Ll, C] with their global rope rows
            if self.compiled_blocks:
                raise ValueError(_COMPILE_WITH_CONTEXT_PARALLEL)
            tokens, rope, attn_op = sharding.shard(tokens, rope)
        rope = torch.view_as_real(rope)  # [L, D/2, 2] (cos, sin): the blocks see no complex tensor
        # Chosen here, outside the (possibly compiled) blocks: they receive a plain function.
        kernel = resolve_attention(tokens.device, self.dtype, self.cfg.head_dim)
        for block in self.blocks:
            tokens = block(tokens, e0, ctx, rope, attn_op, kernel)
        out = self.head(tokens, e)  # [B, L or Ll, P]: per token
        if sharding is not None:
            out = sharding.gather(out, length)
        return self.unpatchify(out.float(), grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """x: [B, L, prod(patch) * C_out] -> [B, C_out, F, H, W]; head values are ordered (pt, ph, pw, c)."""
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw)
