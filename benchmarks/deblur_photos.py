r"""The docs' figure of 128x128 reconstructions, on photographs built into scikit-image.

CelebA images and reconstructions of them are not redistributed (their licence forbids it),
so the documentation shows what a checkpoint trained on CelebA does on photographs anyone
can regenerate, as the paper's Table 1 shows examples: 128x128 crops of four scikit-image
photographs (downscaled by 1/2, as the demo's), measured with the checkpoint's blur and
noise (seeded), restored by Tikhonov-CG, TV and PnP (with the hyperparameters a Table 2 run
tuned, ``--table``) and DE-GRAD::

    python benchmarks/deblur_photos.py --checkpoint runs/table128/jfb/last.pt \
        --table runs/table128/results.json --out docs/_static/deblur_photos_128.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "examples"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import deblur_celeba as flagship  # noqa: E402
import torch  # noqa: E402
from deblur import data, ddp, report  # noqa: E402
from deblur.data import TEST_SEED, image_seeds  # noqa: E402

from benchmarks.deblur_table import baselines  # noqa: E402

#: Photograph -> top left corner of its crop (after downscaling by 1/2); all public domain or
#: CC0 (scikit-image's data licences).
CROPS = {"chelsea": (10, 40), "coffee": (40, 90), "astronaut": (8, 56), "rocket": (40, 96)}


def main(argv: list[str] | None = None) -> int:
    """Write the figure; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a flagship checkpoint")
    parser.add_argument("--table", help="a Table 2 run's results.json: adds TV and PnP")
    parser.add_argument("--size", type=int, default=128, help="crop side")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    _, s, model = flagship.load_model(args.checkpoint, {"device": "cpu"})
    n = args.size
    photos = {name: data.photo(name) for name in CROPS}
    x = torch.stack(
        [data.to_tensor(photos[k][i : i + n, j : j + n]) for k, (i, j) in CROPS.items()]
    )
    flagship.fit_norms(model, (n, n), training=False)
    ctx = ddp.Context(0, 1, torch.device("cpu"))
    rows = flagship.evaluate(model, s, data.Images(x), ctx, keep=len(x))
    columns = {"Ground truth": rows["image/x"], "Measurement": rows["image/measurement"]}
    columns["Tikhonov-CG"] = rows["image/tikhonov_cg"]
    if args.table:
        tuned = json.loads(Path(args.table).read_text())["tuned"]
        A, denoiser = flagship.cell_of(model).operator, flagship.cell_of(model).regularizer
        seeds = image_seeds(TEST_SEED, "test", 0, list(range(len(x))))
        d = flagship.measure(A, x, seeds, s.noise_std)  # the measurements evaluate() made
        for name, x_hat in baselines(A, d, denoiser, tuned).items():
            columns[name.upper() if name == "tv" else "PnP"] = list(x_hat)
    columns[f"DE-GRAD ({s.backward})"] = rows["image/degrad"]
    report.image_grid(columns, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
