"""The reference side of tests/test_clip_score.py: open_clip_torch, run in a process of its own.

    python tests/clip_reference.py SITE SPEC OUT

open_clip needs torchvision, and the only torchvision wheel in reach is PyPI's build for CUDA torch: on the
CPU build of torch its compiled ops do not load, and `import torchvision` stops where it registers fake
kernels for two of them. In the test environment torchvision therefore lives in a folder of its own (`SITE`,
which `make venv` fills with open-clip-torch, timm and torchvision, no dependencies), and only this process
puts it on its path: with torchvision importable, transformers would import it too, everywhere. Here the two
operator names are declared (schemas only: nothing calls them) when that import fails, so the pure-Python
transforms open_clip's preprocessing uses can load.

`SPEC` (JSON) says which model to build (`embed_dim`, `vision_cfg`, `text_cfg` as open_clip takes them), the
seed, the frames (a .npy file, uint8 [n, H, W, 3]), the prompts and the context length. `OUT` receives, with
torch.save: the model's state dict (open_clip's names), the preprocessed pixels [n, 3, S, S], the token ids
[B, L], and the unit image [n, E] and text [B, E] embeddings, all as open_clip computes them.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _import_open_clip(site: str) -> Any:
    sys.path.insert(0, site)
    import torch

    try:
        import torchvision
    except RuntimeError as exc:  # "operator torchvision::nms does not exist": the compiled ops did not load
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        sys.modules["_wanflow_torchvision_ops"] = library  # type: ignore[assignment]  # kept alive
        import torchvision  # noqa: F401
    import open_clip

    return open_clip


def main(site: str, spec_path: str, out_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    open_clip = _import_open_clip(site)
    import numpy as np
    import torch
    from open_clip.model import CustomTextCLIP
    from open_clip.tokenizer import HFTokenizer
    from open_clip.transform import image_transform
    from PIL import Image

    torch.manual_seed(spec["seed"])
    model = CustomTextCLIP(spec["embed_dim"], spec["vision_cfg"], spec["text_cfg"]).eval()
    generator = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():  # every tensor off its initial value (norms included), so each mapping counts
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * spec.get("noise", 0.05))
    preprocess = image_transform(spec["vision_cfg"]["image_size"], is_train=False)
    tokenizer = HFTokenizer(spec["text_cfg"]["hf_tokenizer_name"], context_length=spec["context_length"])
    frames = np.load(spec["frames"])
    pixels = torch.stack([preprocess(Image.fromarray(frame)) for frame in frames])
    ids = tokenizer(spec["prompts"])
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(ids, normalize=True)
    torch.save({"state_dict": model.state_dict(), "pixels": pixels, "ids": ids, "image": image, "text": text,
                "open_clip": open_clip.__version__}, out_path)  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:4])
