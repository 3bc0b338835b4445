"""Image data: training crops from any folder, whole-image evaluation sets, and the bundled `samples`.

Determinism: the k-th training sample of a run (k = 0, 1, 2, ... counted over the whole run) is a pure function of
(seed, k): which image (data.order: `iid`, an image drawn uniformly for every sample, or `shuffle`, a fresh
permutation every epoch as `DataLoader(shuffle=True)` gives), where the crop sits and whether it is flipped. So a run resumed at
step s simply starts at sample s * batch_size, DataLoader workers change nothing, and several processes can draw
disjoint samples by offsetting k.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import LictrainError

log = logging.getLogger("lictrain")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# The colour photographs that ship inside scikit-image (no download). Grey, synthetic and RGBA images are left out.
# chelsea and coffee are held out for validation; the stereo pair motorcycle_left/right stays together in training.
SAMPLES_TRAIN = (
    "astronaut.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
SAMPLES_VAL = ("chelsea.png", "coffee.png")


def samples_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


_SPLIT = re.compile(r"^(?P<path>.*?)\s*\[(?P<part>val|train):(?P<n>-?\d+)\]$")
_warned_spellings: set = set()


def split_files(files: list[Path], part: str, n_val: int, spec: str = "") -> list[Path]:
    """A deterministic hold-out split of a sorted file list: 'val' is `n_val` files spread evenly over the list
    (index floor((i + 1/2) * len / n_val) for i < n_val, so every region of the list contributes: file names
    often group by category or source), 'train' is all the others. The two parts are disjoint and together the
    whole list, whatever else the folder holds."""
    n = len(files)
    if not 1 <= n_val < n:
        raise LictrainError(f"{spec or 'split'}: cannot hold out {n_val} of {n} images (need 1 <= N < {n})")
    held = {int((i + 0.5) * n / n_val) for i in range(n_val)}
    return [f for i, f in enumerate(files) if (i in held) == (part == "val")]


def _split_parts(text: str) -> tuple[str, str | None, int]:
    """(path, 'val' | 'train' | None, N held out). FOLDER[val:N] is N images; FOLDER[train:-N] all but those N.
    FOLDER[train:N], the first spelling of the latter, still means all but N (with a warning: it reads as "N
    images"); FOLDER[val:-N] is refused."""
    m = _SPLIT.match(text.strip())
    if not m:
        return text.strip(), None, 0
    path, part, n = m["path"].strip(), m["part"], int(m["n"])
    if part == "val" and n < 0:
        raise LictrainError(f"{text.strip()}: [val:N] is N held-out images (N > 0); the training part is "
                            f"{path}[train:-{-n}]")
    if part == "train" and n > 0 and text.strip() not in _warned_spellings:
        _warned_spellings.add(text.strip())
        log.warning("%s means the images left after holding %d out for validation, not %d images: write "
                    "%s[train:-%d]", text.strip(), n, n, path, n)
    return path, part, abs(n)


def canonical_split_spelling(spec: str) -> str:
    """The spec with every training split in its first spelling, FOLDER[train:N] (configuration hashes were made
    with it: both spellings name the same images)."""
    return re.sub(r"\[train:-(\d+)\]", r"[train:\1]", spec)


def active_spec(spec: str) -> str:
    """The alternative of an 'A || B' spec that is in use: A if every folder it names exists, else B."""
    while "||" in spec:
        first, rest = spec.split("||", 1)
        parts = [_split_parts(x)[0] for x in first.split(",") if x.strip()]
        if all(x.startswith("samples") or Path(x).expanduser().exists() for x in parts):
            return first.strip()
        spec = rest.strip()
    return spec.strip()


def set_name(spec: str) -> str:
    """A short name for an evaluation set: the folder actually used ('kodak'), or 'samples-val'."""
    first = active_spec(spec).split(",")[0].strip().rstrip("/")
    name = first.split("/")[-1] or first
    return re.sub(r"[^\w.-]+", "-", name).strip("-")  # a file-name part: 'samples:val' and 'kodak[val:6]' too


def resolve_image_files(spec: str) -> list[Path]:
    """Files named by a data spec.

    A spec is 'samples', 'samples:train', 'samples:val', a folder (searched recursively) or an image file; several
    joined by ',' are used together; 'A || B' means A if every folder it names exists, else B (a config can fall
    back to the bundled photos where ../shared/data is absent). A part may end in a hold-out split,
    'FOLDER[val:N]' (N images of FOLDER spread over its sorted list) or 'FOLDER[train:-N]' (all the others; see
    split_files): validation apart from training without copying files.
    """
    if "||" in spec:
        return resolve_image_files(active_spec(spec))
    if "," in spec:
        files = []
        for part in (x.strip() for x in spec.split(",") if x.strip()):
            files += [f for f in resolve_image_files(part) if f not in files]
        return files
    path, part, n_val = _split_parts(spec)
    if part is not None:
        return split_files(resolve_image_files(path), part, n_val, spec)
    if spec in ("samples", "samples:train", "samples:val"):
        names = {"samples": SAMPLES_TRAIN + SAMPLES_VAL, "samples:train": SAMPLES_TRAIN, "samples:val": SAMPLES_VAL}
        return sorted(samples_dir() / n for n in names[spec])
    root = Path(spec).expanduser()
    if not root.exists():
        raise LictrainError(f"image folder not found: {spec}")
    if root.is_file():
        if root.suffix.lower() not in IMAGE_EXTENSIONS:
            raise LictrainError(f"not an image file: {spec}")
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise LictrainError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) in {spec}")
    return files


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image to uint8 H x W x 3. Grey, grey+alpha, RGBA and palette images become RGB (alpha dropped)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the top 8 bits
            arr = np.asarray(im, dtype=np.uint32) >> 8
            im = Image.fromarray(arr.astype(np.uint8))
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 -> float 3 x H x W in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)  # a writable copy


@dataclass
class ImageList:
    """Readable images of a folder, decoded up front when they fit in the cache budget; unreadable ones listed."""

    files: list[Path]
    cached: list[np.ndarray] | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @classmethod
    def scan(cls, spec: str, cache_mb: float = math.inf) -> "ImageList":
        files = resolve_image_files(spec)
        good, skipped, sizes = [], [], []
        for p in files:
            try:
                with Image.open(p) as im:
                    sizes.append(im.width * im.height * 3)
                    im.verify()  # catches truncated and corrupt files without a full decode
                good.append(p)
            except Exception as e:  # PIL raises many types for bad files
                skipped.append((p, _short(e)))
                if len(sizes) > len(good):
                    sizes.pop()
        cached = None
        if sum(sizes) <= cache_mb * 2**20:
            cached, kept = [], []
            for p in good:
                try:
                    cached.append(load_rgb(p))
                    kept.append(p)
                except Exception as e:
                    skipped.append((p, _short(e)))
            good = kept
        for p, why in skipped:
            log.warning("skipping unreadable image %s (%s)", p, why)
        if not good:
            raise LictrainError(f"no readable images in {spec} ({len(skipped)} unreadable)")
        return cls(good, cached, skipped)

    def __len__(self) -> int:
        return len(self.files)

    def get(self, i: int) -> np.ndarray:
        if self.cached is not None:
            return self.cached[i]
        return load_rgb(self.files[i])


def _short(e: Exception) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg[:120]


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
    """A size x size crop at a uniformly random position, flipped left-right with probability 1/2.

    An image smaller than the crop in either side is first padded on the bottom/right by reflection (mirror without
    repeating the edge pixel, numpy's 'reflect'), which keeps image statistics closer than zero padding does.
    """
    h, w = img.shape[:2]
    if h < size or w < size:
        img = np.pad(img, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="reflect")
        h, w = img.shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    out = img[top : top + size, left : left + size]
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return out


ORDERS = ("shuffle", "iid")


class TrainCrops(Dataset):
    """Random crops; item k is the k-th sample of the run (see the module docstring)."""

    def __init__(self, images: ImageList, crop: int, seed: int, order: str = "iid"):
        if order not in ORDERS:
            raise LictrainError(f"data.order must be {' or '.join(ORDERS)}, got '{order}'")
        self.images, self.crop, self.seed, self.order = images, crop, seed, order
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:  # nominal: the sampler is infinite
        return len(self.images)

    def image_index(self, k: int) -> int:
        n = len(self.images)
        if self.order == "iid":  # drawn with replacement: a pure function of (seed, k) too
            return int(np.random.default_rng([self.seed, 2, k]).integers(n))
        epoch = k // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 1, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[k % n])

    def __getitem__(self, k: int) -> torch.Tensor:
        i = self.image_index(k)
        rng = np.random.default_rng([self.seed, 0, k])
        try:
            img = self.images.get(i)
        except Exception as e:  # a file that changed or broke after the scan: use a neighbour, deterministically
            log.warning("skipping unreadable image %s (%s)", self.images.files[i], _short(e))
            img = self.images.get((i + 1) % len(self.images))
        return to_tensor(random_crop(img, self.crop, rng))


class RunSampler(Sampler):
    """Yields global sample numbers from `start` on, forever.

    With several processes, process `rank` of `world` takes its `batch_size` samples of each global batch:
    step s covers samples s*B*world ... (s+1)*B*world - 1 and rank r the r-th block of B of them.
    """

    def __init__(self, start_step: int, batch_size: int, rank: int = 0, world: int = 1):
        self.start_step, self.batch_size, self.rank, self.world = start_step, batch_size, rank, world

    def __iter__(self):
        step, b = self.start_step, self.batch_size
        while True:
            base = step * b * self.world + self.rank * b
            yield from range(base, base + b)
            step += 1

    def __len__(self) -> int:  # pragma: no cover - infinite
        return 2**62


def train_loader(
    images: ImageList, crop: int, batch_size: int, seed: int, start_step: int = 0, workers: int = 0,
    rank: int = 0, world: int = 1, pin_memory: bool = False, order: str = "iid", dataset: Dataset | None = None,
) -> DataLoader:
    """`dataset`: the samples, when they are not image crops (video: lictrain.video.data.SequenceCrops), indexed
    by the run's global sample number as TrainCrops is."""
    ds = dataset if dataset is not None else TrainCrops(images, crop, seed, order)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=RunSampler(start_step, batch_size, rank, world),
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,  # page-locked batches: the copy to the GPU overlaps the step (non_blocking)
        # A private generator, so creating the loader does not consume the global RNG (resume exactness).
        generator=torch.Generator().manual_seed(seed),
    )


class EvalImages(Dataset):
    """Whole images in sorted filename order, optionally centre-cropped and limited in number."""

    def __init__(self, spec: str, crop: int | None = None, max_images: int | None = None):
        self.images = ImageList.scan(spec)
        self.crop = crop
        n = len(self.images) if max_images is None else min(max_images, len(self.images))
        self.indices = list(range(n))

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        return self.images.skipped

    @property
    def files(self) -> list[Path]:
        """The files validated (to check that none is also trained on)."""
        return [self.images.files[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, i: int) -> str:
        return self.images.files[self.indices[i]].name

    def __getitem__(self, i: int) -> torch.Tensor:
        img = self.images.get(self.indices[i])
        if self.crop is not None:
            h, w = img.shape[:2]
            c = min(self.crop, h, w)
            top, left = (h - c) // 2, (w - c) // 2
            img = img[top : top + c, left : left + c]
        return to_tensor(img)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad ... x C x H x W (images N x C x H x W, frame sequences N x T x C x H x W) on the bottom/right so
    H and W are multiples of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    lead = x.shape[:-3]
    padded = F.pad(x.reshape(-1, *x.shape[-3:]), (0, pw, 0, ph), mode="replicate")
    return padded.view(*lead, *padded.shape[-3:])


def crop_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x[..., :h, :w]
