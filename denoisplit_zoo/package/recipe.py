"""Release recipes (packaging/NAME.yaml): who made the model, under which licence, what to cite, which run. Read and
validated here; every field is optional (rdf_templates/rdf.yaml gives the defaults, package/description.py merges)."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import UserError
from ..fileio import read_yaml

NAME_CHARS = set(string.ascii_letters + string.digits + "_+- ()")  # what spec 0.5 allows in `name`


def safe_name(name: str) -> str:
    """Replace characters spec 0.5 refuses in `name` with spaces."""
    return re.sub(r" +", " ", "".join(c if c in NAME_CHARS else " " for c in name)).strip()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipeAuthor(_Strict):
    """No github_user on purpose: spec validation would query the GitHub API (offline tests crash)."""

    name: str
    affiliation: Optional[str] = None
    email: Optional[str] = None
    orcid: Optional[str] = None


class RecipeCitation(_Strict):
    text: str
    doi: Optional[str] = None
    url: Optional[str] = None  # note: validation HEAD-requests URLs (online); prefer a DOI

    @model_validator(mode="after")
    def _one_link(self):
        if not (self.doi or self.url):
            raise ValueError("a citation needs a doi or a url")
        return self


class RecipeTrainingData(_Strict):
    description: str  # what the images are (organism, structures, microscope, noise)
    source: Optional[str] = None  # where to get them (free text, shown in the model card)
    zoo_id: Optional[str] = None  # a bioimage.io dataset id, if the data is in the zoo


class Recipe(_Strict):
    """A release recipe (packaging/NAME.yaml). Every field is optional: rdf_templates/rdf.yaml gives defaults.
    Relative paths (`run`, `evaluation`) are relative to the recipe file."""

    run: Optional[str] = None  # run folder
    name: Optional[str] = None
    description: Optional[str] = None
    authors: list[RecipeAuthor] = []
    license: Optional[str] = None  # SPDX id; default CC-BY-4.0
    citations: list[RecipeCitation] = []  # added after the denoiSplit paper
    training_data: Optional[RecipeTrainingData] = None
    tags: list[str] = []  # added to the default tags
    version: Optional[str] = None
    channel_names: Optional[tuple[str, str]] = None  # rename the two structures (default: the run's names)
    n_samples: Optional[int] = Field(None, ge=1)  # K posterior samples per prediction (default 16)
    seed: Optional[int] = Field(None, ge=0, lt=2**31)
    evaluation: Optional[str] = None  # REPORT_DIR of `denoisplit-zoo evaluate` (metrics.json, figures)
    git_repo: Optional[str] = None

    @model_validator(mode="after")
    def _zoo_rules(self):
        if self.name is not None and (not 5 <= len(self.name) <= 128 or set(self.name) - NAME_CHARS):
            raise ValueError("name: 5..128 characters, only letters, digits, spaces and _+-()")
        if "careamics" in {t.lower() for t in self.tags}:  # the zoo would test it with CAREamics, which fails
            raise ValueError("tags: `careamics` makes the zoo run its CAREamics check, which cannot load this model")
        return self


def load_recipe(path) -> Recipe:
    """Read and validate packaging/NAME.yaml; unknown keys are errors (a typo must not be silently ignored)."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a mapping")
    try:
        rec = Recipe.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise UserError(f"{path}: {where}: {err['msg']}") from None
    base = path.resolve().parent
    upd = {k: str(base / v) for k in ("run", "evaluation") if (v := getattr(rec, k)) and not Path(v).is_absolute()}
    return rec.model_copy(update=upd)
