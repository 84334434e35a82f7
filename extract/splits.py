"""Train/validation/test: the split names and the settings that assign them, defined once.

Three different things carry "split" in their name, kept apart:
- ``SplitSettings``: how hash splits are drawn (shares, seed, ``split_group``), stored as store
  attributes and copied into fine-tuned model sidecars (key ``split_settings``);
- the per-image split: the store's ``/images/split`` column (``ImageTable.split``,
  ``FeatureSet.splits``), the only place an image's split is read from once a store exists;
- split counts: images per split (``split_counts``), for summaries.

    >>> settings = SplitSettings.resolve(store_attrs, seed=None)   # the store's, or the defaults
    >>> settings.to_attrs()
    {'validation_split': 0.1, 'test_split': 0.1, 'seed': 0, 'split_group': ''}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

from extract.errors import DatasetError, StoreError

SPLITS = ("train", "validation", "test")
GROUP_BY_CHOICES = ("none", "near-duplicates")  # --split-group-by (see extract/leak_free.py)
# Where a store's validation images come from (store attribute ``validation_source``):
VALIDATION_BY_HASH = "hash"  # DIR/<class>/: a share of every class's images, by hash
VALIDATION_FOLDER = "folder"  # DIR/{train,validation,test}/: the validation (val, valid) folder
VALIDATION_FROM_TRAIN = "train-by-hash"  # DIR/{train,test}/ without one: a share of train/, by the same hash rule
LAYOUT_ATTRS = ("layout", "validation_source")  # store attributes that describe the folder's layout


@dataclass(frozen=True)
class SplitSettings:
    """How each image of a class-folder data set is given a split (split folders ignore these)."""

    validation_split: float = 0.1  # share of images for validation
    test_split: float = 0.1  # share of images for test
    seed: int = 0
    split_group: str = ""  # regex removed from paths before hashing, so copies share a split ("" = none)
    split_group_by: str = "none"  # "near-duplicates": copies found in the features share a split

    def __post_init__(self) -> None:
        v, t = self.validation_split, self.test_split
        if not (0 <= v < 1 and 0 <= t < 1 and v + t < 1):
            raise DatasetError("--validation-split and --test-split must be in [0, 1) and sum to less than 1")
        if self.split_group_by not in GROUP_BY_CHOICES:
            raise DatasetError(f"--split-group-by must be one of {', '.join(GROUP_BY_CHOICES)}, "
                               f"got {self.split_group_by!r}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The store attributes that hold the settings."""
        return tuple(f.name for f in fields(cls))

    def to_attrs(self) -> dict:
        return asdict(self)

    @classmethod
    def resolve(cls, stored: dict | None = None, **requested) -> SplitSettings:
        """The settings for a store: ``requested`` values (None = not given) over the ``stored``
        attributes over the defaults. A store keeps the settings it was built with: a requested value
        that differs from a stored one is refused, since it would move images between splits.
        """
        unknown = set(requested) - set(cls.keys())
        if unknown:
            raise TypeError(f"unknown split settings: {', '.join(sorted(unknown))}")
        defaults = cls()
        stored = {k: stored[k] for k in cls.keys() if stored and k in stored}
        clash = sorted(k for k, v in requested.items() if v is not None and k in stored and v != stored[k])
        if clash:
            given = ", ".join(f"--{k.replace('_', '-')} {stored[k] if stored[k] != '' else repr('')}" for k in clash)
            raise StoreError(f"this store was built with {given}; pass the same values or use a new --store")
        values = {}
        for key in cls.keys():
            default = getattr(defaults, key)
            chosen = requested.get(key)
            values[key] = type(default)(chosen if chosen is not None else stored.get(key, default))
        return cls(**values)


def describe_validation(attrs: dict) -> str | None:
    """Where a store's validation split comes from, for ``store info`` (None for a store that predates
    the ``validation_source`` attribute)."""
    source = attrs.get("validation_source")
    share = f"{float(attrs.get('validation_split', 0)) * 100:g} %"
    seed = attrs.get("seed", 0)
    if source == VALIDATION_FROM_TRAIN:
        return f"{share} of train/ by hash (seed {seed}; no validation folder; test/ untouched)"
    if source == VALIDATION_BY_HASH:
        return f"{share} of the images by hash (seed {seed})"
    if source == VALIDATION_FOLDER:
        return "the validation folder"
    return None


def split_counts(splits: Iterable[str]) -> dict[str, int]:
    """Images per split, every split named (0 when empty), in ``SPLITS`` order."""
    counts = Counter(splits)
    return {split: counts.get(split, 0) for split in SPLITS}
