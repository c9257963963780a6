"""Lazy access to slide images: full-resolution files and in-memory hires / lowres arrays.

A :class:`SlideImage` works in FULL-RESOLUTION pixel coordinates (those of
``obsm["spatial"]``: x = column, y = row) whatever it reads from. It keeps a list of levels
(the image at decreasing resolutions) and reads each request from the coarsest level that
still has at least the requested output resolution:

- TIFF / BigTIFF (tiled or stripped, any compression tifffile decodes): strips / tiles are
  read and decoded on demand (an LRU cache keeps recent ones); uncompressed contiguous files
  are memory-mapped; pyramid levels stored in the file are used; other levels are built by
  streaming over the finest stored level in blocks, never holding the whole image.
- JPEG: reduced levels (1/2, 1/4, 1/8) come from the decoder itself (``PIL.Image.draft``,
  fast and small); coarser ones are reduced from the 1/8 level. Full-resolution reads decode
  the file once into an on-disk ``numpy.memmap`` cache in a temporary folder (removed by
  :meth:`SlideImage.close`), so a large JPEG never sits in RAM between reads.
- PNG and other PIL formats: decoded once (into a memmap when larger than 64 MB).
- In-memory arrays (``uns["spatial"][lib]["images"]["hires"/"lowres"]``) with their scale
  factor: a crop finer than the array is upsampled from it.

Pixel convention: pixel ``(row, col)`` of the full-resolution image is centred on the
coordinate ``(y, x) = (row, col)`` (as in Space Ranger's ``pxl_row_in_fullres``), so a crop
of odd size ``s`` at integer centre ``(x, y)`` with ``out_px == s`` equals
``image[y - s//2 : y + s//2 + 1, x - s//2 : x + s//2 + 1]`` exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tissuegraph import _layout as L
from tissuegraph.errors import InputError, one_line

__all__ = [
    "SlideImage",
    "open_image",
    "image_shape",
    "read_small_image",
    "read_thumbnail",
]

TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8", ".svs", ".ome.tif", ".ome.tiff"}
_IN_MEMORY_BYTES = 64 << 20  # decoded images above this size go to an on-disk memmap
_TILE_CACHE_BYTES = 256 << 20


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _pil_unbounded():
    """Let PIL open large slides (its decompression-bomb guard is meant for web images)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _to_rgb_uint8(a: np.ndarray) -> np.ndarray:
    """Any image array (HxW, HxWx1, HxWx3, HxWx4; uint8/uint16/float/bool) as uint8 HxWx3."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"expected an image array of 2 or 3 dimensions, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 2:  # grey + alpha
        a = np.repeat(a[:, :, :1], 3, axis=2)
    elif a.shape[2] > 3:
        a = a[:, :, :3]
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return (a // 257).astype(np.uint8)
    if a.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(a)) <= 1.0 + 1e-6 else 1.0
        return np.clip(np.nan_to_num(a) * scale + 0.5, 0, 255).astype(np.uint8)
    info = np.iinfo(a.dtype) if a.dtype.kind in "iu" else None
    if info is not None and info.max > 255:
        return np.clip(a.astype(np.float64) * 255.0 / info.max + 0.5, 0, 255).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def _pil_to_rgb(im) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _to_rgb_uint8(np.asarray(im))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def _is_tiff(path: Path) -> bool:
    name = path.name.lower()
    if any(name.endswith(s) for s in TIFF_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")


def _corrupt(path: Path, exc: BaseException) -> InputError:
    return InputError(
        f"{path}: unreadable or corrupt image ({one_line(exc, limit=None)}); "
        "re-export it as TIFF, JPEG or PNG"
    )


def read_small_image(path: str | os.PathLike) -> np.ndarray:
    """Read a small image (e.g. Space Ranger hires / lowres PNG) as uint8 ``[H, W, 3]``."""
    from PIL import Image

    path = Path(path)
    try:
        with _pil_unbounded(), Image.open(path) as im:
            return _pil_to_rgb(im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise _corrupt(path, exc) from None


def image_shape(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header only."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path} (check image_path)")
    try:
        if _is_tiff(path):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.series[0].keyframe if tif.series else tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        from PIL import Image

        with _pil_unbounded(), Image.open(path) as im:
            return int(im.size[1]), int(im.size[0])
    except InputError:
        raise
    except Exception as exc:  # PIL / tifffile raise many exception types on bad files
        raise _corrupt(path, exc) from None


def read_thumbnail(path: str | os.PathLike, max_side: int) -> tuple[np.ndarray, float]:
    """A downsampled copy of an image file whose longer side is about ``max_side`` pixels.

    Returns ``(image uint8 [h, w, 3], scale)`` with ``scale = h / H`` (thumbnail px per
    full-resolution px), as a Space Ranger ``tissue_*_scalef``.
    """
    with SlideImage.from_file(path) as img:
        return img.thumbnail(max_side)


def _tiff_microns_per_pixel(tif, page) -> float | None:
    """Pixel size from an Aperio ``MPP = ...`` description, OME ``PhysicalSizeX`` (µm), or
    resolution tags in cm / inch when they imply < 10 µm per pixel; else ``None``."""
    import re

    desc = str(getattr(page, "description", "") or "")
    m = re.search(r"\bMPP\s*=\s*([0-9.]+)", desc)
    if m:
        return float(m.group(1))
    m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', str(getattr(tif, "ome_metadata", "") or ""))
    if m:
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata or "")
        if unit is None or unit.group(1) in ("µm", "um", "\u00b5m"):
            return float(m.group(1))
    try:
        tags = page.tags
        unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
        num, den = tags["XResolution"].value
        per_unit = num / den if den else 0.0
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if per_unit <= 0:
        return None
    um = {2: 25400.0, 3: 10000.0}.get(unit)
    if um is None:
        return None
    mpp = um / per_unit
    return float(mpp) if mpp < 10.0 else None


# ----------------------------------------------------------------------------- levels
class _Level:
    """The image at one resolution: ``sx``, ``sy`` level px per full-resolution px."""

    def __init__(
        self,
        sx: float,
        sy: float,
        shape: tuple[int, int],
        array: np.ndarray | None = None,
        reader: Callable[[int, int, int, int], np.ndarray] | None = None,
    ):
        self.sx, self.sy = float(sx), float(sy)
        self.shape = (int(shape[0]), int(shape[1]))
        self.array = array
        self.reader = reader

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """uint8 ``[y1-y0, x1-x0, 3]``, zero outside the level."""
        h, w = self.shape
        out = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 3), dtype=np.uint8)
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if cy1 <= cy0 or cx1 <= cx0:
            return out
        if self.array is not None:
            block = self.array[cy0:cy1, cx0:cx1]
        else:
            block = self.reader(cy0, cy1, cx0, cx1)
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = block
        return out


def _alloc(shape: tuple[int, ...], tmpdir: Callable[[], Path], name: str) -> np.ndarray:
    nbytes = int(np.prod(shape))
    if nbytes <= _IN_MEMORY_BYTES:
        return np.zeros(shape, dtype=np.uint8)
    fn = tmpdir() / f"{name}.u8"
    return np.memmap(fn, dtype=np.uint8, mode="w+", shape=shape)


def _reduce(level: _Level, k: int, tmpdir: Callable[[], Path], name: str) -> _Level:
    """Block-mean downsample ``level`` by an integer factor ``k``, streaming row blocks."""
    h, w = level.shape
    h2, w2 = math.ceil(h / k), math.ceil(w / k)
    out = _alloc((h2, w2, 3), tmpdir, name)
    rows = max(1, (32 << 20) // max(1, w * 3 * k)) * k  # ~32 MB of source per block
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        block = level.read(y0, y1, 0, w)
        ph, pw = (-block.shape[0]) % k, (-block.shape[1]) % k
        if ph or pw:
            block = np.pad(block, ((0, ph), (0, pw), (0, 0)), mode="edge")
        bh, bw = block.shape[0] // k, block.shape[1] // k
        red = block.reshape(bh, k, bw, k, 3).mean(axis=(1, 3), dtype=np.float32)
        out[y0 // k : y0 // k + bh] = (red + 0.5).astype(np.uint8)
    return _Level(level.sx / k, level.sy / k, (h2, w2), array=out)


class _TiffReader:
    """Reads rectangles of one TIFF page by decoding only the strips / tiles it covers."""

    def __init__(self, tif, page, lock: threading.Lock):
        self.tif, self.page, self.lock = tif, page, lock
        self.h, self.w = int(page.imagelength), int(page.imagewidth)
        self.tiled = bool(page.is_tiled)
        if self.tiled:
            self.th, self.tw = int(page.tilelength), int(page.tilewidth)
            self.nx = math.ceil(self.w / self.tw)
        else:
            self.th, self.tw = int(page.rowsperstrip or self.h), self.w
            self.th = min(self.th, self.h)
            self.nx = 1
        self.offsets = page.dataoffsets
        self.counts = page.databytecounts
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_bytes = 0

    def _segment(self, index: int) -> np.ndarray:
        seg = self.cache.get(index)
        if seg is not None:
            self.cache.move_to_end(index)
            return seg
        if index >= len(self.offsets):
            raise InputError(f"{self.tif.filehandle.path}: segment {index} missing; truncated file")
        off, n = int(self.offsets[index]), int(self.counts[index])
        with self.lock:
            fh = self.tif.filehandle
            if n > 0:
                fh.seek(off)
                data = fh.read(n)
                if len(data) != n:
                    raise InputError(f"{fh.path}: truncated image data; re-export the file")
            else:
                data = None
        page = self.page
        try:
            dec, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        except InputError:
            raise
        except Exception as exc:
            raise _corrupt(Path(self.tif.filehandle.path), exc) from None
        if dec is None:
            seg = np.zeros((self.th, self.tw, 3), dtype=np.uint8)
        else:
            seg = _to_rgb_uint8(np.asarray(dec).reshape(shape)[0])
        self.cache[index] = seg
        self.cache_bytes += seg.nbytes
        while self.cache_bytes > _TILE_CACHE_BYTES and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= old.nbytes
        return seg

    def __call__(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        for ty in range(y0 // self.th, (y1 - 1) // self.th + 1):
            for tx in range(x0 // self.tw, (x1 - 1) // self.tw + 1):
                seg = self._segment(ty * self.nx + tx)
                sy0, sx0 = ty * self.th, tx * self.tw
                a0, a1 = max(y0, sy0), min(y1, sy0 + seg.shape[0])
                b0, b1 = max(x0, sx0), min(x1, sx0 + seg.shape[1])
                if a1 > a0 and b1 > b0:
                    out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = seg[
                        a0 - sy0 : a1 - sy0, b0 - sx0 : b1 - sx0
                    ]
        return out


# ----------------------------------------------------------------------------- SlideImage
class SlideImage:
    """A slide image addressed in full-resolution pixels, read lazily.

    Build it with :func:`open_image` (from an AnnData), :meth:`from_file` or
    :meth:`from_array`. Use as a context manager or call :meth:`close` to release the file and
    the on-disk caches.

    Attributes
    ----------
    shape
        ``(height, width)`` in full-resolution pixels.
    microns_per_pixel
        Physical size of one full-resolution pixel (``None`` when unknown).
    path
        The image file, or ``None`` for an in-memory image.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        natives: list[tuple[float, float, Callable[[], _Level]]],
        *,
        microns_per_pixel: float | None = None,
        path: Path | None = None,
        closers: list[Callable[[], None]] | None = None,
    ):
        self.shape = (int(shape[0]), int(shape[1]))
        self.microns_per_pixel = None if microns_per_pixel is None else float(microns_per_pixel)
        self.path = path
        # native levels, finest first: (sx, sy, factory); built on first use
        self._natives = sorted(natives, key=lambda t: -t[0])
        self._native_cache: dict[int, _Level] = {}
        self._reduced: dict[tuple[int, int], _Level] = {}
        self._closers = list(closers or [])
        self._tmp: Path | None = None
        self._finalizer = weakref.finalize(self, SlideImage._cleanup, self._closers, [None])

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_array(
        cls,
        image: np.ndarray,
        scale: float = 1.0,
        *,
        microns_per_pixel: float | None = None,
        full_shape: tuple[int, int] | None = None,
    ) -> SlideImage:
        """An in-memory image whose pixel ``i`` is full-resolution pixel ``i / scale``
        (``scale`` = Space Ranger ``tissue_hires_scalef`` / ``tissue_lowres_scalef``)."""
        arr = _to_rgb_uint8(image)
        if scale <= 0:
            raise InputError(f"image scale factor must be positive, got {scale}")
        shape = full_shape or (
            int(round(arr.shape[0] / scale)),
            int(round(arr.shape[1] / scale)),
        )
        level = _Level(scale, scale, arr.shape[:2], array=arr)
        return cls(shape, [(scale, scale, lambda: level)], microns_per_pixel=microns_per_pixel)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, microns_per_pixel: float | None = None
    ) -> SlideImage:
        """Open a TIFF / BigTIFF, JPEG or PNG lazily (only the header is read here)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"image not found: {path} (check image_path)")
        try:
            if _is_tiff(path):
                return cls._open_tiff(path, microns_per_pixel)
            return cls._open_pil(path, microns_per_pixel)
        except InputError:
            raise
        except Exception as exc:
            raise _corrupt(path, exc) from None

    @classmethod
    def _open_tiff(cls, path: Path, mpp: float | None) -> SlideImage:
        import tifffile

        tif = tifffile.TiffFile(path)
        lock = threading.Lock()
        try:
            series = tif.series[0]
            levels = list(getattr(series, "levels", None) or [series])
            base = levels[0].keyframe
            H, W = int(base.imagelength), int(base.imagewidth)
            natives = []
            for lvl in levels:
                page = lvl.keyframe
                h, w = int(page.imagelength), int(page.imagewidth)
                natives.append((w / W, h / H, cls._tiff_level_factory(tif, page, lock, W, H)))
            if mpp is None:
                mpp = _tiff_microns_per_pixel(tif, base)
        except Exception:
            tif.close()
            raise
        return cls((H, W), natives, microns_per_pixel=mpp, path=path, closers=[tif.close])

    @staticmethod
    def _tiff_level_factory(tif, page, lock, W: int, H: int) -> Callable[[], _Level]:
        def make() -> _Level:
            h, w = int(page.imagelength), int(page.imagewidth)
            sx, sy = w / W, h / H
            spp = int(page.samplesperpixel)
            contiguous = page.planarconfig == 1 or spp == 1
            if page.is_memmappable and page.dtype == np.uint8 and spp in (1, 3) and contiguous:
                arr = page.asarray(out="memmap")
                if arr.ndim == 2:
                    return _Level(
                        sx, sy, (h, w), reader=lambda a, b, c, d: _to_rgb_uint8(arr[a:b, c:d])
                    )
                return _Level(sx, sy, (h, w), array=arr)
            if contiguous and int(getattr(page, "imagedepth", 1) or 1) == 1:
                return _Level(sx, sy, (h, w), reader=_TiffReader(tif, page, lock))
            if h * w * spp * page.dtype.itemsize <= 4 * _IN_MEMORY_BYTES:
                return _Level(
                    sx, sy, (h, w), array=_to_rgb_uint8(np.moveaxis(page.asarray(), 0, -1))
                )
            raise InputError(
                f"{tif.filehandle.path}: planar-separate or volumetric TIFF too large to read by "
                "region; re-save it as a tiled RGB (contiguous) TIFF"
            )

        return make

    @classmethod
    def _open_pil(cls, path: Path, mpp: float | None) -> SlideImage:
        from PIL import Image

        with _pil_unbounded():
            im = Image.open(path)
            W, H = im.size
            fmt = im.format
            im.close()
        self_ref: list[SlideImage] = []

        def decode_full() -> _Level:
            with _pil_unbounded(), Image.open(path) as im:
                try:
                    im.load()
                except (OSError, ValueError, SyntaxError) as exc:
                    raise _corrupt(path, exc) from None
                out = _alloc((H, W, 3), self_ref[0]._tmpdir, "full")
                step = max(1, (16 << 20) // (W * 3))
                for y0 in range(0, H, step):
                    y1 = min(H, y0 + step)
                    out[y0:y1] = _pil_to_rgb(im.crop((0, y0, W, y1)))
            return _Level(1.0, 1.0, (H, W), array=out)

        natives = [(1.0, 1.0, decode_full)]
        if fmt == "JPEG":
            for f in (2, 4, 8):
                if W // f >= 16 and H // f >= 16:
                    natives.append((1.0 / f, 1.0 / f, cls._draft_factory(path, W, H, f)))
        obj = cls((H, W), natives, microns_per_pixel=mpp, path=path)
        self_ref.append(obj)
        return obj

    @staticmethod
    def _draft_factory(path: Path, W: int, H: int, f: int) -> Callable[[], _Level]:
        def make() -> _Level:
            from PIL import Image

            with _pil_unbounded(), Image.open(path) as im:
                im.draft("RGB", (math.ceil(W / f), math.ceil(H / f)))
                try:
                    arr = _pil_to_rgb(im)
                except (OSError, ValueError, SyntaxError) as exc:
                    raise _corrupt(path, exc) from None
            h, w = arr.shape[:2]
            return _Level(w / W, h / H, (h, w), array=arr)

        return make

    # ------------------------------------------------------------------ lifecycle
    def _tmpdir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="tissuegraph-img-"))
            self._finalizer.detach()
            self._finalizer = weakref.finalize(
                self, SlideImage._cleanup, self._closers, [self._tmp]
            )
        return self._tmp

    @staticmethod
    def _cleanup(closers: list, tmps: list) -> None:
        for c in closers:
            with contextlib.suppress(Exception):
                c()
        for t in tmps:
            if t is not None:
                shutil.rmtree(t, ignore_errors=True)

    def close(self) -> None:
        """Release the file handle and delete on-disk caches."""
        self._native_cache.clear()
        self._reduced.clear()
        self._finalizer()

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        src = str(self.path) if self.path else "in-memory"
        return (
            f"SlideImage({src}, shape={self.shape}, microns_per_pixel={self.microns_per_pixel}, "
            f"levels={[round(s, 4) for s, _, _ in self._natives]})"
        )

    # ------------------------------------------------------------------ levels
    def _native(self, i: int) -> _Level:
        lvl = self._native_cache.get(i)
        if lvl is None:
            lvl = self._natives[i][2]()
            self._native_cache[i] = lvl
        return lvl

    def _level_for(self, min_scale: float) -> _Level:
        """The coarsest level with ``scale >= min_scale`` (level px per full-res px); the
        finest level when none is fine enough (the result is then upsampled)."""
        scales = [s for s, _, _ in self._natives]
        ok = [i for i, s in enumerate(scales) if s >= min_scale * (1 - 1e-6)]
        i = ok[-1] if ok else 0
        s = scales[i]
        k = 1
        while s / (2 * k) >= min_scale * (1 - 1e-6):
            k *= 2
        # never reduce below ~16 px
        native = self._native(i)
        while k > 1 and min(native.shape) / k < 16:
            k //= 2
        if k == 1:
            return native
        key = (i, k)
        lvl = self._reduced.get(key)
        if lvl is None:
            # reduce from the largest already-built reduction of the same native level
            src, f = native, 1
            for (j, kk), cand in self._reduced.items():
                if j == i and kk < k and k % kk == 0 and kk > f:
                    src, f = cand, kk
            lvl = _reduce(src, k // f, self._tmpdir, f"level{i}_{k}")
            self._reduced[key] = lvl
        return lvl

    # ------------------------------------------------------------------ reading
    def _sample(
        self,
        boxes: np.ndarray,
        out_hw: tuple[int, int],
        progress: bool = False,
    ) -> np.ndarray:
        """Resample boxes ``[M, 4]`` = (x0, y0, x1, y1), full-res pixel-EDGE coordinates
        (pixel ``i`` spans ``[i, i + 1)``), to ``out_hw``; zero outside the image."""
        from PIL import Image

        M = len(boxes)
        oh, ow = int(out_hw[0]), int(out_hw[1])
        out = np.zeros((M, oh, ow, 3), dtype=np.uint8)
        if M == 0:
            return out
        bw = float(np.max(boxes[:, 2] - boxes[:, 0]))
        bh = float(np.max(boxes[:, 3] - boxes[:, 1]))
        lvl = self._level_for(max(ow / max(bw, 1e-9), oh / max(bh, 1e-9)))
        lb = boxes * np.array([lvl.sx, lvl.sy, lvl.sx, lvl.sy])  # level edge coordinates
        # integer window with a margin for the resampling filter's support
        margin = 2 + int(math.ceil(max(bw * lvl.sx / ow, bh * lvl.sy / oh)))
        ix0 = np.floor(lb[:, 0]).astype(np.int64) - margin
        iy0 = np.floor(lb[:, 1]).astype(np.int64) - margin
        ix1 = np.ceil(lb[:, 2]).astype(np.int64) + margin
        iy1 = np.ceil(lb[:, 3]).astype(np.int64) + margin
        lh, lw = lvl.shape
        inside = (ix1 > 0) & (iy1 > 0) & (ix0 < lw) & (iy0 < lh)
        idx = np.flatnonzero(inside)
        if progress and len(idx) > 1:
            from tissuegraph._utils import progress_bar

            idx = progress_bar(idx, desc="image crops", unit="crop", leave=False, mininterval=1.0)
        for i in idx:
            region = lvl.read(int(iy0[i]), int(iy1[i]), int(ix0[i]), int(ix1[i]))
            box = (
                float(lb[i, 0] - ix0[i]),
                float(lb[i, 1] - iy0[i]),
                float(lb[i, 2] - ix0[i]),
                float(lb[i, 3] - iy0[i]),
            )
            im = Image.fromarray(region, mode="RGB")
            out[i] = np.asarray(im.resize((ow, oh), Image.Resampling.BILINEAR, box=box))
        return out

    def crop(
        self,
        center_xy_px: np.ndarray,
        size_px: float,
        out_px: int,
        *,
        progress: bool = False,
    ) -> np.ndarray:
        """Square crops centred on spots, resampled to ``out_px``.

        Parameters
        ----------
        center_xy_px
            ``[M, 2]`` centres in full-resolution pixels (x = column, y = row), e.g.
            ``adata.obsm["spatial"]``.
        size_px
            Side length of each crop in full-resolution pixels (``size_um /
            microns_per_pixel``).
        out_px
            Side length of the returned crops in pixels.
        progress
            Show a progress bar over batches of crops.

        Returns
        -------
        uint8 ``[M, out_px, out_px, 3]``; zero outside the image. Each crop is read from the
        coarsest level that still has ``out_px / size_px`` px per full-resolution px and
        resampled with PIL's bilinear filter (antialiased when downsampling); it is upsampled
        when the image is coarser than the request (e.g. a lowres-only Visium slide).
        """
        c = np.asarray(center_xy_px, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(c).all():
            raise InputError("crop centres contain NaN or infinite values; check obsm['spatial']")
        if not size_px > 0 or int(out_px) < 1:
            raise InputError(f"crop size must be positive (size_px={size_px}, out_px={out_px})")
        out_px = int(out_px)
        half = float(size_px) / 2.0
        # pixel i is centred on coordinate i: edge-space centre is c + 0.5
        ce = c + 0.5
        boxes = np.column_stack(
            [ce[:, 0] - half, ce[:, 1] - half, ce[:, 0] + half, ce[:, 1] + half]
        )
        return self._sample(boxes, (out_px, out_px), progress=progress)

    def read_region(
        self,
        x0: float,
        y0: float,
        x1: float,
        y1: float,
        out_shape: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """The rectangle ``[y0:y1, x0:x1]`` of the full-resolution image (zero outside).

        ``out_shape = (h, w)`` resamples it (reading from a coarse level when it is much
        smaller than the region); ``None`` returns it at full resolution,
        ``(round(y1 - y0), round(x1 - x0))``, upsampled when only a coarse image exists.
        """
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"empty region x0={x0}, y0={y0}, x1={x1}, y1={y1}")
        if out_shape is None:
            out_shape = (max(1, round(y1 - y0)), max(1, round(x1 - x0)))
        box = np.array([[x0, y0, x1, y1]], dtype=np.float64)
        return self._sample(box, (int(out_shape[0]), int(out_shape[1])))[0]

    def thumbnail(self, max_side: int = 1000) -> tuple[np.ndarray, float]:
        """The whole image with its longer side ``max_side`` px: ``(uint8 [h, w, 3], scale)``
        with ``scale`` thumbnail px per full-resolution px."""
        H, W = self.shape
        s = min(1.0, max_side / max(H, W))
        h, w = max(1, round(H * s)), max(1, round(W * s))
        img = self._sample(np.array([[0.0, 0.0, W, H]]), (h, w))[0]
        return img, float(h / H)


def open_image(adata, *, library_id: str | None = None, prefer: str = "auto") -> SlideImage:
    """The slide image of an AnnData read by :mod:`tissuegraph.io`.

    Parameters
    ----------
    adata
        AnnData with ``uns["tissuegraph"]`` and / or ``uns["spatial"][library_id]``.
    library_id
        Which library of ``uns["spatial"]``; defaults to ``uns["tissuegraph"]["library_id"]``
        or the only one.
    prefer
        ``"auto"``: the full-resolution file (``uns["tissuegraph"]["image_path"]``) when set and
        present, else the in-memory ``hires`` image, else ``lowres``. ``"file"``, ``"hires"``
        or ``"lowres"`` force one source.

    Returns
    -------
    :class:`SlideImage` in full-resolution pixel coordinates with ``microns_per_pixel`` from
    ``uns["tissuegraph"]`` (or ``55 / spot_diameter_fullres``).
    """
    tg = dict(adata.uns.get(L.TISSUEGRAPH, {}) or {})
    spatial = adata.uns.get(L.SPATIAL, {}) or {}
    lib = library_id or tg.get(L.LIBRARY_ID)
    if lib not in spatial:
        lib = next(iter(spatial), None) if len(spatial) == 1 or lib is None else lib
    entry = spatial.get(lib, {}) if lib is not None else {}
    images = entry.get("images", {}) or {}
    sf = entry.get("scalefactors", {}) or {}
    mpp = tg.get(L.MICRONS_PER_PIXEL)
    if mpp is None and sf.get("spot_diameter_fullres"):
        mpp = 55.0 / float(sf["spot_diameter_fullres"])
    if prefer not in ("auto", "file", "hires", "lowres"):
        raise InputError(f"prefer={prefer!r}: expected 'auto', 'file', 'hires' or 'lowres'")
    path = tg.get(L.IMAGE_PATH) or None
    if prefer in ("auto", "file") and path:
        if Path(path).is_file():
            return SlideImage.from_file(path, microns_per_pixel=mpp)
        if prefer == "file" or not images:
            raise InputError(
                f"uns['tissuegraph']['image_path'] = {path} does not exist; set it to the "
                "full-resolution image of this slide"
            )
        warnings.warn(
            f"full-resolution image {path} not found; using the in-memory image", stacklevel=2
        )
    if prefer == "file":
        raise InputError(
            "uns['tissuegraph']['image_path'] is not set; this slide has no image file"
        )
    order = ["hires", "lowres"] if prefer == "auto" else [prefer]
    for key in order:
        img = images.get(key)
        s = sf.get(f"tissue_{key}_scalef")
        if img is not None and s:
            return SlideImage.from_array(np.asarray(img), float(s), microns_per_pixel=mpp)
    src = f" (read from {tg['source']})" if tg.get("source") else ""
    raise InputError(
        f"no image for library {lib!r}{src}: set uns['tissuegraph']['image_path'] or provide "
        "uns['spatial'][lib]['images']['hires'/'lowres'] with their tissue_*_scalef"
    )
