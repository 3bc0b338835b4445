"""Rebuild lictrain/anchors/published/*.json, the published R-D curves lictrain ships, from a CompressAI checkout.

The numbers are CompressAI's own measurements (VTM, BPG, HM, AV1, JPEG, WebP, JPEG 2000 and its trained models, on
Kodak and CLIC 2020) and published papers' points that CompressAI collected; this script keeps bpp, PSNR-RGB,
MS-SSIM-RGB and the timings of each, with the file, commit and licence they come from.

    python benchmarks/published_curves.py /path/to/CompressAI   # a git checkout (its HEAD is recorded)
"""

import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "lictrain" / "anchors" / "published"

CLASSICAL = {"vtm": "vtm", "bpg": "bpg_444_x265_ycbcr", "hm": "hm", "av1": "av1", "jpeg": "jpeg", "webp": "webp",
             "jpeg2000": "jpeg2000"}
MODELS = ["bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean", "mbt2018", "cheng2020-anchor",
          "cheng2020-attn"]
PAPERS = {"elic-paper": "paper-elic2022_mse", "cheng2020-checkerboard-paper": "paper-cheng2020-checkerboard-6M_mse",
          "minnen2020-paper": "paper-minnen2020-cc10_mse"}
IMAGES = {"kodak": 24}  # the images each point averages, where the set is fixed (CLIC's splits changed over the years)
KEYS = ("bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time")


def main(repo: str) -> None:
    repo = Path(repo)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()

    def read(rel: str) -> dict | None:
        path = repo / "results" / "image" / rel
        return json.loads(path.read_text()) if path.exists() else None

    for dataset in ("kodak", "clic2020-professional", "clic2020-mobile"):
        curves = {}
        files = {name: f"{dataset}/{stem}.json" for name, stem in CLASSICAL.items()}
        # CompressAI's models decoded to 8 bits, as lictrain measures (the other folder keeps float reconstructions)
        files.update({f"{m}": f"8bit-decoded/{dataset}/compressai-{m}_mse_ans_cuda.json" for m in MODELS})
        files.update({f"{m}-ms-ssim": f"8bit-decoded/{dataset}/compressai-{m}_ms-ssim_ans_cuda.json" for m in MODELS})
        if dataset == "kodak":
            files.update({name: f"kodak/{stem}.json" for name, stem in PAPERS.items()})
        for name, rel in files.items():
            data = read(rel)
            if data is None:
                continue
            results = {k: data["results"][k] for k in KEYS if k in data["results"]}
            curves[name] = {"name": data["name"], "description": data.get("description", ""),
                            "file": f"results/image/{rel}", "results": results}
        doc = {"dataset": dataset, "images": IMAGES.get(dataset),
               "source": {"repository": "https://github.com/InterDigitalInc/CompressAI", "commit": commit,
                          "licence": "BSD-3-Clause-Clear (the repository's)",
                          "note": "bpp from file sizes, PSNR/MS-SSIM on RGB, means over the set's images, as "
                                  "CompressAI measured them; paper-* curves are the papers' published points"},
               "curves": curves}
        (OUT / f"{dataset}.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{dataset}: {len(curves)} curves")


if __name__ == "__main__":
    main(sys.argv[1])
