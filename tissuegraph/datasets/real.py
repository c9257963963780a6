"""Named public datasets, resolved from a local data folder (``$TISSUEGRAPH_DATA``).

The folder holds (see ``docs/datasets.md`` for where to obtain each one)::

    $TISSUEGRAPH_DATA/
        dlpfc/151673/, dlpfc/151674/     Space Ranger folders + layers.tsv
        her2st/B4, C2, C3, C4, C5/       counts.tsv.gz, spots.tsv, he.jpg,
                                         celltype_proportions_major.tsv
        priors/                          collectri_human.csv, progeny_human_top100.tsv, ...

Nothing is downloaded: the functions only read local files and fail with a one-line
message saying what to set or fetch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..errors import InputError

__all__ = [
    "DLPFC_SAMPLES",
    "DLPFC_STANDARD",
    "HER2ST_SECTIONS",
    "data_dir",
    "dlpfc",
    "dlpfc_labels",
    "dlpfc_sections",
    "her2st",
    "her2st_proportions",
    "priors_dir",
    "read_slide",
]

#: spatialLIBD DLPFC sections (10x Visium) known to the data folder layout.
DLPFC_SAMPLES: tuple[str, ...] = ("151673", "151674")
#: The 12 sections of the spatialLIBD study (any of them found in the data folder is used).
DLPFC_STANDARD: tuple[str, ...] = (
    "151507",
    "151508",
    "151509",
    "151510",
    "151669",
    "151670",
    "151671",
    "151672",
    "151673",
    "151674",
    "151675",
    "151676",
)
#: HER2+ breast cancer sections (legacy ST) known to the data folder layout.
HER2ST_SECTIONS: tuple[str, ...] = ("B4", "C2", "C3", "C4", "C5")

ENV_VAR = "TISSUEGRAPH_DATA"
_WHERE = (
    "DLPFC from spatialLIBD (LieberInstitute/HumanPilot, Maynard et al. 2021), HER2ST from "
    "github.com/almaan/her2st (Andersson et al. 2021), priors from CollecTRI/DoRothEA, "
    "PROGENy and LIANA (see docs/datasets.md)"
)


def data_dir() -> Path:
    """The local folder of public datasets, from ``$TISSUEGRAPH_DATA``.

    Returns
    -------
    The folder as an absolute :class:`~pathlib.Path`.

    Raises
    ------
    InputError
        If the variable is unset or does not name an existing folder.
    """
    value = os.environ.get(ENV_VAR)
    if not value:
        raise InputError(
            f"${ENV_VAR} is not set: set it to the folder holding dlpfc/, her2st/ and priors/ "
            f"({_WHERE})"
        )
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise InputError(
            f"${ENV_VAR}={value} is not a folder: point it at the folder holding dlpfc/, "
            f"her2st/ and priors/ ({_WHERE})"
        )
    return path


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{what} not found at {path}: check ${ENV_VAR} ({_WHERE})")
    return path


def dlpfc_sections() -> list[str]:
    """DLPFC sections present under ``$TISSUEGRAPH_DATA/dlpfc``: folders named like one of
    :data:`DLPFC_STANDARD`, or any folder with a ``layers.tsv``; sorted by name."""
    root = data_dir() / "dlpfc"
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and (p.name in DLPFC_STANDARD or (p / "layers.tsv").is_file())
    )


def _dlpfc_dir(sample: str) -> Path:
    sample = str(sample)
    path = data_dir() / "dlpfc" / sample
    if sample not in DLPFC_STANDARD and not (path / "layers.tsv").is_file():
        found = ", ".join(dlpfc_sections()) or "none"
        raise InputError(
            f"unknown DLPFC sample {sample!r}: not a spatialLIBD section name and "
            f"{path} has no layers.tsv (found: {found})"
        )
    return _need(path, f"DLPFC sample {sample}")


def _her2st_dir(section: str) -> Path:
    section = str(section)
    if section not in HER2ST_SECTIONS:
        known = ", ".join(HER2ST_SECTIONS)
        raise InputError(f"unknown HER2ST section {section!r}: use one of {known}")
    return _need(data_dir() / "her2st" / section, f"HER2ST section {section}")


def dlpfc(sample: str = "151673"):
    """One DLPFC section (10x Visium, spatialLIBD), read with :func:`tissuegraph.io.read_visium`.

    Parameters
    ----------
    sample
        One of :data:`DLPFC_SAMPLES`.

    Returns
    -------
    AnnData in the tissuegraph layout (raw counts, lowres image, ``library_id`` =
    ``sample``). Layer labels are not attached: see :func:`dlpfc_labels`.
    """
    from ..io import read_visium

    folder = _dlpfc_dir(sample)
    return read_visium(folder, library_id=str(sample))


def dlpfc_labels(sample: str = "151673") -> pd.Series:
    """Manual layer annotation (L1-L6, WM) of a DLPFC section.

    Parameters
    ----------
    sample
        One of :data:`DLPFC_SAMPLES`.

    Returns
    -------
    Categorical :class:`pandas.Series` named ``"layer"``, indexed by spot barcode. Spots
    without a label are left out.
    """
    path = _need(_dlpfc_dir(sample) / "layers.tsv", f"DLPFC {sample} layer labels")
    table = pd.read_csv(path, sep="\t", dtype=str)
    if "barcode" not in table.columns or "layer" not in table.columns:
        raise InputError(f"{path}: expected columns 'barcode' and 'layer'")
    table = table.dropna(subset=["layer"])
    table = table[table["layer"].str.strip() != ""]
    order = sorted(table["layer"].unique(), key=lambda s: (s == "WM", s))
    series = pd.Series(
        pd.Categorical(table["layer"].to_numpy(), categories=order),
        index=pd.Index(table["barcode"].to_numpy(), name="barcode"),
        name="layer",
    )
    return series


def her2st(section: str = "C2"):
    """One HER2+ breast cancer section (legacy ST), read with :func:`tissuegraph.io.read_st`.

    Parameters
    ----------
    section
        One of :data:`HER2ST_SECTIONS`.

    Returns
    -------
    AnnData in the tissuegraph layout (raw counts, spots ``"XxY"``, full-resolution
    ``he.jpg`` read lazily, ``library_id`` = ``section``).
    """
    from ..io import read_st

    folder = _her2st_dir(section)
    counts = _need(folder / "counts.tsv.gz", f"HER2ST {section} counts")
    spots = _need(folder / "spots.tsv", f"HER2ST {section} spot table")
    image = _need(folder / "he.jpg", f"HER2ST {section} H&E image")
    return read_st(counts, spots, image, library_id=str(section))


def her2st_proportions(section: str = "C2") -> pd.DataFrame:
    """Per-spot cell-type proportions of a HER2ST section (stereoscope, by the authors).

    Parameters
    ----------
    section
        One of :data:`HER2ST_SECTIONS`.

    Returns
    -------
    DataFrame spots x 8 major cell types (B-cells, CAFs, Endothelial, Epithelial, Myeloid,
    Plasma Cells, PVL, T-cells), indexed by spot id ``"XxY"``; rows sum to about 1.
    """
    path = _need(
        _her2st_dir(section) / "celltype_proportions_major.tsv",
        f"HER2ST {section} cell-type proportions",
    )
    table = pd.read_csv(path, sep="\t", index_col=0)
    table.index = table.index.astype(str)
    table.index.name = "spot"
    return table.astype("float64")


def priors_dir() -> Path:
    """The folder of prior-knowledge tables (``$TISSUEGRAPH_DATA/priors``).

    Holds ``collectri_human.csv``, ``dorothea_human_ABC.tsv``, ``progeny_human_top100.tsv``
    and ``liana_consensus_human.tsv``; read them with ``tissuegraph.io.read_tf_targets``,
    ``read_pathways`` and ``read_ligand_receptor``.
    """
    return _need(data_dir() / "priors", "prior-knowledge folder")


def read_slide(spec):
    """One slide of a ``BuildConfig``: ``format: synthetic`` is simulated
    (:func:`~tissuegraph.datasets.simulate_slide` with ``n_spots``, ``seed``), every other
    format is read by :func:`tissuegraph.io.read_slide`."""
    if str(getattr(spec, "format", "") or "").lower() == "synthetic":
        from tissuegraph.datasets.simulate import simulate_slide

        return simulate_slide(n_spots=int(spec.n_spots), seed=int(spec.seed))
    from tissuegraph.io import read_slide as read_io

    return read_io(spec)
