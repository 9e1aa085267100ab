"""SynthOcc presets: how many identities, images, cameras and occlusions to generate.

``tiny`` is for tests (about 150 images, a couple of seconds), ``demo`` is sized for a tiny ViT
on two CPU cores (minutes), ``full`` mirrors the proportions of Occluded-Duke (702 training
ids, 519 query ids, 1,110 gallery ids).

``tiny_rich``, ``demo_rich`` and ``full_rich`` (issue #13) are the representative layout and
``demo_rich`` is the default of ``occreid demo`` and the shipped recipes: the same sizes and
plans, with detector-like framing, identity cues in every horizontal stripe (garment
textures, hats, scarves, shoes and boots, hair; ``Preset.appearance = "rich"``) and four
backgrounds per camera (``Preset.background_variants``).

The older layouts stay, byte-identical, so that old tables can be reproduced:
``tiny_detector``, ``demo_detector`` and ``full_detector`` are the same sizes with
detector-like framing (``Preset.framing``). ``tiny_cues`` and ``demo_cues`` are ``tiny`` and
``demo`` with identity cues in the head and feet of every identity (``Preset.appearance``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Tuple

__all__ = ["Preset", "PRESETS", "TINY", "DEMO", "FULL", "FRAMINGS", "APPEARANCES", "NEW_FIELD_DEFAULTS"]

#: Person framing inside the box (see ``Preset.framing``).
FRAMINGS = ("scene", "detector")
#: Identity cues (see ``Preset.appearance``).
APPEARANCES = ("outfit", "part_cues", "rich")
#: Fields added after the first presets, with the default that reproduces the old output;
#: ``synthocc.json`` lists such a field only when a preset sets another value.
NEW_FIELD_DEFAULTS = {"framing": "scene", "appearance": "outfit", "background_variants": 1}


@dataclass(frozen=True)
class Preset:
    """Sizes and rates of one SynthOcc variant. Ranges ``(lo, hi)`` are inclusive.

    Attributes:
        name: preset name, written to ``synthocc.json``.
        num_train_ids: identities in ``bounding_box_train/``.
        num_query_ids: test identities; each has queries and gallery images.
        num_distractor_ids: gallery-only identities (no queries).
        num_cameras: cameras used (1..8); camera ids in file names are 1-based.
        train_images_per_id: images per training identity.
        gallery_images_per_id: gallery images per test identity (>= 2, in >= 2 cameras).
        distractor_images_per_id: gallery images per distractor identity.
        extra_queries_per_id: extra queries (random type) on top of the holistic, NPO and
            NTP query every test identity gets.
        cameras_per_id: how many cameras a test identity walks past (training
            identities: 2 to 4).
        train_occluded_ratio: share of occluded training images (Occluded-Duke: mostly
            holistic training set).
        gallery_occluded_ratio: share of occluded gallery images beyond the two holistic
            ones every test identity has.
        ntp_share: share of NTP (person) among occluded train/gallery images; the rest NPO.
        npo_fraction: range of the box fraction an NPO object covers.
        npo_side_weights: relative frequency of NPO on (top, bottom, left, right).
        family_size: identities per outfit family (siblings share upper or lower body).
        family_kind_weights: relative frequency of (shared upper, shared lower, singleton)
            families.
        ntp_pool_size: non-dataset pedestrians used as NTP occluders.
        ntp_other_id_ratio: share of NTP occluders that are another identity of the same
            split instead of a non-dataset pedestrian.
        num_occluder_patches: crops in ``occluders/`` (FED's NPO patch bank).
        image_size: saved box size (height, width).
        framing: ``"scene"`` (the original presets: the person's height in the box follows
            the camera's ``scale``, 0.78-0.97 of the box, feet 1-3.5 % above the bottom) or
            ``"detector"`` (tight boxes as a pedestrian detector crops them, the same for
            every camera: person height 0.93-0.99 of the box times the build, clipped so the
            head stays inside, feet 0.5-2.5 % above the bottom). Added for issue #13; a
            preset at the default writes no ``framing`` key, so old datasets are unchanged.
        appearance: ``"outfit"`` (the original presets: identities differ by outfit, and
            siblings of a family share one half of it, head and shoes included) or
            ``"part_cues"`` (issue #13: every dataset identity also gets its own head and feet:
            hair style and colour or a cap of its own colour, and its own shoe colour, drawn
            from continuous ranges with a separate random stream, so the outfits, families,
            cameras and occlusions are those of the ``"outfit"`` preset of the same seed).
            On ``"outfit"`` presets the top and bottom quarters of a box carry almost no
            identity (docs/results.md); real pedestrians differ there too.
            ``"rich"`` (issue #13): ``"part_cues"`` plus, from a stream of their own, a garment
            texture over torso and sleeves and one over the lower garment (noise blotches,
            diagonal stripes, plaid, dots or colour blocks, each with a colour of its own), a
            hat (beanie, brim hat, hood) for a third of the identities, a scarf for 30 %, shoes
            from trainers to boots and a 12-30 % broader build. Siblings keep sharing their
            half of the outfit (its texture included) and their build.
        background_variants: backgrounds per camera (1: the camera's one panorama, the old
            presets). More draw further panoramas of the same scene kind with shifted colours
            and horizon from a stream of their own, and each image picks one from its own
            seed (issue #13: within-camera background variation).
    """

    name: str
    num_train_ids: int
    num_query_ids: int
    num_distractor_ids: int
    num_cameras: int = 6
    train_images_per_id: Tuple[int, int] = (8, 12)
    gallery_images_per_id: Tuple[int, int] = (6, 10)
    distractor_images_per_id: Tuple[int, int] = (3, 6)
    extra_queries_per_id: Tuple[int, int] = (0, 1)
    cameras_per_id: Tuple[int, int] = (3, 5)
    train_occluded_ratio: float = 0.12
    gallery_occluded_ratio: float = 0.08
    ntp_share: float = 0.4
    npo_fraction: Tuple[float, float] = (0.25, 0.5)
    npo_side_weights: Tuple[float, float, float, float] = (0.2, 0.4, 0.2, 0.2)
    family_size: Tuple[int, int] = (2, 4)
    family_kind_weights: Tuple[float, float, float] = (0.4, 0.4, 0.2)
    ntp_pool_size: int = 60
    ntp_other_id_ratio: float = 0.5
    num_occluder_patches: int = 40
    image_size: Tuple[int, int] = (128, 64)
    framing: str = "scene"
    appearance: str = "outfit"
    background_variants: int = 1

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"preset {self.name!r}: {what}")

        check(self.num_train_ids >= 1 and self.num_query_ids >= 1, "needs train and query ids")
        check(self.num_distractor_ids >= 0, "num_distractor_ids must be >= 0")
        check(2 <= self.num_cameras <= 8, "num_cameras must be 2..8 (Duke-style c1..c8)")
        total = self.num_train_ids + self.num_query_ids + self.num_distractor_ids
        check(total <= 9999, "at most 9999 identities (4-digit pids)")
        for field in ("train_images_per_id", "gallery_images_per_id", "distractor_images_per_id",
                      "extra_queries_per_id", "cameras_per_id", "family_size"):
            lo, hi = getattr(self, field)
            check(0 <= lo <= hi, f"{field} must be an ordered (lo, hi) range")
        check(self.gallery_images_per_id[0] >= 2, "test ids need >= 2 gallery images")
        check(self.train_images_per_id[0] >= 1, "train ids need >= 1 image")
        check(self.cameras_per_id[0] >= 2 and self.cameras_per_id[1] <= self.num_cameras,
              "cameras_per_id must lie in 2..num_cameras")
        check(self.family_size[0] >= 1, "family_size must be >= 1")
        lo, hi = self.npo_fraction
        check(0.0 < lo <= hi < 0.7, "npo_fraction must lie in (0, 0.7)")
        for field in ("train_occluded_ratio", "gallery_occluded_ratio", "ntp_share",
                      "ntp_other_id_ratio"):
            check(0.0 <= getattr(self, field) <= 1.0, f"{field} must lie in [0, 1]")
        check(self.num_occluder_patches >= 2, "need >= 2 occluder patches (tall and wide)")
        check(self.ntp_pool_size >= 1, "ntp_pool_size must be >= 1")
        check(len(self.image_size) == 2 and min(self.image_size) >= 16,
              "image_size must be (height, width), both >= 16")
        check(self.framing in FRAMINGS, f"framing must be one of {FRAMINGS}")
        check(self.appearance in APPEARANCES, f"appearance must be one of {APPEARANCES}")
        check(isinstance(self.background_variants, int) and 1 <= self.background_variants <= 16,
              "background_variants must be an integer in 1..16")


TINY = Preset(
    name="tiny",
    num_train_ids=12,
    num_query_ids=8,
    num_distractor_ids=2,
    num_cameras=6,
    train_images_per_id=(5, 7),
    gallery_images_per_id=(4, 5),
    distractor_images_per_id=(3, 3),
    extra_queries_per_id=(0, 0),
    cameras_per_id=(3, 4),
    ntp_pool_size=8,
    num_occluder_patches=8,
)

DEMO = Preset(
    name="demo",
    num_train_ids=150,
    num_query_ids=100,
    num_distractor_ids=30,
    num_cameras=6,
    train_images_per_id=(8, 12),
    gallery_images_per_id=(8, 10),
    distractor_images_per_id=(3, 6),
    extra_queries_per_id=(0, 1),
    cameras_per_id=(3, 5),
    ntp_pool_size=60,
    num_occluder_patches=40,
)

FULL = Preset(
    name="full",
    num_train_ids=702,
    num_query_ids=519,
    num_distractor_ids=591,
    num_cameras=8,
    train_images_per_id=(14, 30),
    gallery_images_per_id=(10, 18),
    distractor_images_per_id=(6, 14),
    extra_queries_per_id=(0, 2),
    cameras_per_id=(3, 6),
    ntp_pool_size=200,
    num_occluder_patches=80,
)

# Issue #13: the same sizes with detector-like framing (new presets; the old ones above are
# unchanged and keep producing byte-identical data).
TINY_DETECTOR = replace(TINY, name="tiny_detector", framing="detector")
DEMO_DETECTOR = replace(DEMO, name="demo_detector", framing="detector")
FULL_DETECTOR = replace(FULL, name="full_detector", framing="detector")

TINY_CUES = replace(TINY, name="tiny_cues", appearance="part_cues")
DEMO_CUES = replace(DEMO, name="demo_cues", appearance="part_cues")

# Issue #13, the representative preset: detector framing, rich identity cues in every
# stripe, four backgrounds per camera.
_RICH = dict(framing="detector", appearance="rich", background_variants=4)
TINY_RICH = replace(TINY, name="tiny_rich", **_RICH)
DEMO_RICH = replace(DEMO, name="demo_rich", **_RICH)
FULL_RICH = replace(FULL, name="full_rich", **_RICH)

#: Preset name -> Preset.
PRESETS: Dict[str, Preset] = {
    p.name: p for p in (TINY, DEMO, FULL, TINY_DETECTOR, DEMO_DETECTOR, FULL_DETECTOR, TINY_CUES,
                        DEMO_CUES, TINY_RICH, DEMO_RICH, FULL_RICH)}
