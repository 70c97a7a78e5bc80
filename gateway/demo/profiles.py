"""Case mixes of the synthetic registries: value sets, distribution tables and per-site profiles.

Known sites (:data:`SITE_PROFILES`) have hand-written, clearly different case mixes; any other
site name gets a profile derived deterministically from the name (:func:`profile_for`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

SEXES: tuple[str, ...] = ("F", "M")
PRIMARY_SITES: tuple[str, ...] = (
    "breast",
    "lung",
    "colorectal",
    "prostate",
    "melanoma",
    "lymphoma",
    "pancreas",
    "other",
)
STAGES: tuple[str, ...] = ("I", "II", "III", "IV")
VITAL_STATUSES: tuple[str, ...] = ("alive", "deceased")
TREATMENT_TYPES: tuple[str, ...] = (
    "surgery",
    "chemotherapy",
    "radiotherapy",
    "immunotherapy",
    "hormone",
)

MIN_YEAR = 2010
MAX_YEAR = 2024
FOLLOW_UP_END_YEAR = 2025  # follow-up runs to the end of this year
MAX_SURVIVAL_MONTHS = 180
MAX_TREATMENT_DAY = 1800
MIN_AGE, MAX_AGE = 18, 99
MIN_BMI, MAX_BMI = 15.0, 50.0
MIN_COST, MAX_COST = 100.0, 250_000.0
HEAVY_TAIL_MIN_ROWS, HEAVY_TAIL_MAX_ROWS = 20, 40

_BREAST, _PROSTATE = PRIMARY_SITES.index("breast"), PRIMARY_SITES.index("prostate")
_SURGERY = TREATMENT_TYPES.index("surgery")

# Per-primary-site clinical shape, shared by all sites (rows follow PRIMARY_SITES).
# Age offsets relative to the site mean: prostate/pancreas older, lymphoma and
# melanoma younger, so age is plausible per cancer type.
_AGE_OFFSET = np.array([-4.0, 4.0, 3.0, 7.0, -8.0, -12.0, 5.0, 0.0])
_AGE_SD = np.array([11.0, 9.0, 10.0, 7.0, 14.0, 16.0, 9.0, 13.0])
# Weight loss is typical at diagnosis for lung/pancreas; obesity is a risk
# factor for breast/colorectal.
_BMI_OFFSET = np.array([1.0, -1.5, 1.0, 0.5, 0.0, -0.5, -2.0, 0.0])
# Multipliers on the site's stage weights: pancreas and lung present late,
# screened cancers (breast, prostate) and visible ones (melanoma) early.
_STAGE_MULT = np.array(
    [
        [1.6, 1.3, 0.8, 0.45],  # breast
        [0.6, 0.6, 1.1, 2.0],  # lung
        [0.9, 1.1, 1.2, 0.9],  # colorectal
        [1.3, 1.4, 0.7, 0.6],  # prostate
        [1.8, 1.1, 0.7, 0.5],  # melanoma
        [0.8, 1.0, 1.1, 1.2],  # lymphoma
        [0.3, 0.5, 1.2, 2.6],  # pancreas
        [1.0, 1.0, 1.0, 1.0],  # other
    ]
)
# Monthly death hazard by stage, scaled per primary site (pancreas worst).
_STAGE_HAZARD = np.array([0.002, 0.005, 0.015, 0.045])
_SITE_HAZARD = np.array([0.7, 1.6, 1.0, 0.5, 0.8, 0.9, 3.0, 1.1])
_AGE_HAZARD_PER_YEAR = 0.035  # log-hazard slope per year of age around 65
_LOSS_TO_FOLLOW_UP_MEAN_MONTHS = 240.0
# More advanced disease means more lines of therapy.
_STAGE_TREATMENT_MULT = np.array([0.8, 1.0, 1.1, 1.25])
# Treatment-type mix per primary site (columns follow TREATMENT_TYPES).
_TYPE_BY_SITE = np.array(
    [
        [0.30, 0.25, 0.20, 0.05, 0.20],  # breast
        [0.20, 0.35, 0.25, 0.18, 0.02],  # lung
        [0.35, 0.40, 0.15, 0.08, 0.02],  # colorectal
        [0.25, 0.08, 0.30, 0.02, 0.35],  # prostate
        [0.40, 0.05, 0.10, 0.43, 0.02],  # melanoma
        [0.03, 0.60, 0.17, 0.18, 0.02],  # lymphoma
        [0.20, 0.55, 0.15, 0.08, 0.02],  # pancreas
        [0.30, 0.35, 0.20, 0.10, 0.05],  # other
    ]
)
# Stage reshapes the mix: surgery for early disease, systemic therapy for late.
_TYPE_BY_STAGE = np.array(
    [
        [1.6, 0.6, 0.9, 0.4, 1.0],
        [1.2, 1.0, 1.1, 0.7, 1.0],
        [0.8, 1.3, 1.2, 1.1, 1.0],
        [0.3, 1.4, 0.9, 1.6, 1.0],
    ]
)
# Flattened (primary site x stage) -> treatment-type weights, row = site * 4 + stage.
_TYPE_WEIGHTS = (_TYPE_BY_SITE[:, None, :] * _TYPE_BY_STAGE[None, :, :]).reshape(-1, 5)
_TYPE_DAY_MEAN = np.array([25.0, 90.0, 120.0, 200.0, 150.0])  # days after previous line
_DAYS_PER_LINE = 45.0  # later rows of a patient happen later on average
_CYCLE_P = np.array([0.0, 0.4, 0.3, 0.45, 0.6])  # cycles = 1 + Binomial(11, p)
_COST_MEDIAN = np.array([22_000.0, 4_000.0, 5_000.0, 15_000.0, 600.0])
_COST_SIGMA = np.array([0.6, 0.6, 0.5, 0.6, 0.8])
_COST_CYCLE_EXPONENT = 0.7  # per-cycle cost with some economies of scale


@dataclass(frozen=True)
class SiteProfile:
    """Case mix of one site; weights are relative and normalised on use.

    ``stage_weights`` follow ``STAGES``; ``primary_site_weights`` follow
    ``PRIMARY_SITES``. ``treatments_mean`` is the mean number of treatment rows
    per (non heavy-tail) patient; ``heavy_tail_share`` patients get 20..40 rows.
    """

    stage_weights: tuple[float, float, float, float]
    primary_site_weights: tuple[float, float, float, float, float, float, float, float]
    age_mean: float
    female_share: float
    treatments_mean: float
    year_min: int = MIN_YEAR
    year_max: int = MAX_YEAR
    bmi_mean: float = 27.5
    heavy_tail_share: float = 0.01

    def __post_init__(self) -> None:
        """Reject profiles that would break the table contracts."""
        if len(self.stage_weights) != len(STAGES) or min(self.stage_weights) < 0:
            raise ValueError("stage_weights: need 4 non-negative weights")
        if (
            len(self.primary_site_weights) != len(PRIMARY_SITES)
            or min(self.primary_site_weights) < 0
        ):
            raise ValueError("primary_site_weights: need 8 non-negative weights")
        if sum(self.stage_weights) <= 0 or sum(self.primary_site_weights) <= 0:
            raise ValueError("weights must not all be zero")
        if not MIN_YEAR <= self.year_min <= self.year_max <= MAX_YEAR:
            raise ValueError(f"year range must lie within {MIN_YEAR}..{MAX_YEAR}")
        if (
            not 0.0 <= self.female_share <= 1.0
            or not 0.0 <= self.heavy_tail_share <= 1.0
        ):
            raise ValueError("shares must lie in [0, 1]")
        if self.treatments_mean < 1.0:
            raise ValueError("treatments_mean must be >= 1 (every patient has a row)")


SITE_PROFILES: dict[str, SiteProfile] = {
    # Screening-heavy, older population: early stages, breast/prostate.
    "north": SiteProfile(
        stage_weights=(0.40, 0.30, 0.19, 0.11),
        primary_site_weights=(0.26, 0.12, 0.14, 0.18, 0.10, 0.05, 0.03, 0.12),
        age_mean=66.0,
        female_share=0.50,
        treatments_mean=3.2,
    ),
    # Late presentation, fewer resources: advanced stages, lung/pancreas.
    "south": SiteProfile(
        stage_weights=(0.16, 0.22, 0.28, 0.34),
        primary_site_weights=(0.18, 0.20, 0.14, 0.10, 0.04, 0.06, 0.08, 0.20),
        age_mean=63.0,
        female_share=0.47,
        treatments_mean=2.6,
        year_min=2014,
        bmi_mean=26.0,
    ),
    # Young tertiary referral centre: melanoma/lymphoma, many treatment lines.
    "east": SiteProfile(
        stage_weights=(0.28, 0.30, 0.25, 0.17),
        primary_site_weights=(0.20, 0.10, 0.10, 0.08, 0.18, 0.16, 0.04, 0.14),
        age_mean=58.0,
        female_share=0.55,
        treatments_mean=3.8,
        year_min=2012,
        bmi_mean=26.5,
    ),
    # Older, smoking-heavy region with a shorter registry history.
    "west": SiteProfile(
        stage_weights=(0.25, 0.27, 0.26, 0.22),
        primary_site_weights=(0.15, 0.24, 0.18, 0.14, 0.05, 0.05, 0.07, 0.12),
        age_mean=68.0,
        female_share=0.45,
        treatments_mean=3.0,
        year_max=2022,
        bmi_mean=28.5,
    ),
}


def _digest_int(*parts: object) -> int:
    """Stable 128-bit integer from the parts (process-independent, unlike hash())."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:16], "big")


def _derived_profile(site: str) -> SiteProfile:
    """Plausible profile for an unknown site, a pure function of its name."""
    rng = np.random.default_rng(_digest_int("gateway.synth.profile", site))
    # Dirichlet around a typical mix keeps every category present but varied.
    stage = rng.dirichlet(np.array([0.28, 0.27, 0.24, 0.21]) * 20.0)
    primary = rng.dirichlet(
        np.array([0.20, 0.15, 0.14, 0.12, 0.08, 0.07, 0.05, 0.19]) * 30.0
    )
    year_min = int(rng.integers(MIN_YEAR, MIN_YEAR + 5))
    return SiteProfile(
        stage_weights=_rounded4(stage),
        primary_site_weights=_rounded8(primary),
        age_mean=round(float(rng.uniform(58.0, 69.0)), 1),
        female_share=round(float(rng.uniform(0.42, 0.58)), 3),
        treatments_mean=round(float(rng.uniform(2.5, 3.8)), 2),
        year_min=year_min,
        year_max=int(rng.integers(max(year_min, MAX_YEAR - 4), MAX_YEAR + 1)),
        bmi_mean=round(float(rng.uniform(25.5, 29.0)), 1),
    )


def _rounded4(w: FloatArray) -> tuple[float, float, float, float]:
    """Four weights rounded for a readable, stable profile repr."""
    a, b, c, d = (round(float(x), 4) for x in w)
    return (a, b, c, d)


def _rounded8(
    w: FloatArray,
) -> tuple[float, float, float, float, float, float, float, float]:
    """Eight weights rounded for a readable, stable profile repr."""
    a, b, c, d, e, f, g, h = (round(float(x), 4) for x in w)
    return (a, b, c, d, e, f, g, h)


def _profile(site: str) -> SiteProfile:
    """Known profile by exact name, otherwise one derived from the name."""
    return SITE_PROFILES.get(site) or _derived_profile(site)


