"""Image panels as files, whatever the logger: RUN_DIR/images/step_0000100/<panel>.png (the batch as
one row grid) with captions.json, and RUN_DIR/images/index.html showing every step, newest first.
A run without W&B (or on a cluster without internet) still shows what the model does."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path


from infd.image import tensor_to_pil


class PanelWriter:
    def __init__(self, root: Path, title: str):
        self.root, self.title = root, title

    def write(self, images: dict, step: int) -> None:
        """images: name -> (B, 3, H, W) in [-1, 1], or (that, B captions)."""
        from torchvision.utils import make_grid  # torchvision's import takes a second; only panels need it

        out = self.root / f"step_{step:07d}"
        out.mkdir(parents=True, exist_ok=True)
        captions = {}
        for name, value in images.items():
            batch, texts = value if isinstance(value, tuple) else (value, None)
            grid = make_grid(batch.detach().float().cpu().clamp(-1, 1), nrow=min(len(batch), 8), padding=2,
                             pad_value=1.0)
            tensor_to_pil(grid).save(out / f"{file_name(name)}.png")
            if texts:
                captions[file_name(name)] = list(texts)
        (out / "captions.json").write_text(json.dumps(captions, indent=1))
        self.write_index()

    def write_index(self) -> None:
        steps = sorted((p for p in self.root.glob("step_*") if p.is_dir()), reverse=True)
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for d in steps:
            body.append(f"<h2>step {int(d.name[5:])}</h2><div class=row>")
            captions = json.loads((d / "captions.json").read_text()) if (d / "captions.json").exists() else {}
            for png in sorted(d.glob("*.png")):
                texts = "".join(f"<li>{html.escape(t)}</li>" for t in captions.get(png.stem, []))
                body.append(f"<figure><a href='{d.name}/{png.name}'><img src='{d.name}/{png.name}'></a>"
                            f"<figcaption>{html.escape(png.stem)}<ol>{texts}</ol></figcaption></figure>")
            body.append("</div>")
        style = ("body{font-family:sans-serif} .row{display:flex;flex-wrap:wrap;gap:12px} "
                 "img{max-width:480px;image-rendering:pixelated} figcaption{font-size:13px}")
        page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
        tmp = self.root / "index.html.tmp"
        tmp.write_text(page)
        tmp.replace(self.root / "index.html")


def file_name(panel: str) -> str:
    """'images/recon_256' -> 'recon_256'; anything but [A-Za-z0-9_.-] becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", panel.removeprefix("images/"))

