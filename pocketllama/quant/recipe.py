"""Quantization recipes: which modules become int8 / int4, by name (`int8`, `int4-g32`, `int4-g32-e4g128`, ...)
or as a dict that a saved checkpoint records in config.json (`pocketllama_quantization`). Never inferred from
file names."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from .primitives import INT4_GROUP_SIZES

Kind = Literal["int8", "int4"]
FORMAT_VERSION = 1
# Module names of the Llama text model, optionally inside Llama 3.2 Vision (`language_model.`), whose
# cross-attention blocks quantize like the self-attention ones.
_PREFIX = r"(?:language_model\.)?"
_BLOCK_LINEAR = re.compile(_PREFIX + r"model\.layers\.\d+\.(self_attn|cross_attn|mlp)\.\w+_proj")
_EMBEDDING = re.compile(_PREFIX + r"model\.embed_tokens")
_LM_HEAD = re.compile(_PREFIX + r"lm_head")
# Llama 3.2 Vision's encoder linears (local and gated global layers) and its projector into the text trunk
_VISION = re.compile(r"vision_model\.(?:transformer|global_transformer)\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.fc[12])"
                     r"|multi_modal_projector")
VISION_SUFFIX = "-v8"  # a named recipe + "-v8": the same with the vision encoder's linears int8
INT4_ROW_MULTIPLE = 16  # PyTorch's int4 kernels pack output rows in blocks of 16


@dataclass(frozen=True)
class QSpec:
    """How one module is stored: int8 (group_size None = one scale per output row) or int4 groupwise
    (`symmetric`: no zeros, w = (q - 8) * scale)."""

    kind: Kind
    group_size: int | None = None
    symmetric: bool = False


@dataclass(frozen=True)
class Recipe:
    """Weight-only quantization of a Llama: block linears, token embedding, output projection.

    A tied model has one table for the embedding and the output; it follows `embedding`, and `lm_head`
    must agree (the int8 or int4 table serves both lookups and the logits matmul). Int4 block linears use
    `group_size`; an int4 token table and an int4 `lm_head` (tied or not: the two vocabulary matrices) use
    `embedding_group_size`, None meaning `group_size`. Named recipes:

    - `int8`: everything int8, one scale per row.
    - `int4-g32` (also g64, g128, g256): block linears int4 in groups of 32 values, token table and
      output int8 per row: Meta's own scheme for its quantized 1B / 3B (1B: 0.87 GB of weights).
    - `int4-g32-e4` (also g64, g128, g256): as `int4-g32` but the token table and output are int4 too, in
      the same groups. 1B: g32 0.77 GB; g64 0.70 GB, under the release table's 0.75 GB for 4-bit. The
      4-bit vocabulary costs some accuracy (SmolLM2-135M perplexity: +4% at g32, +12% at g64).
    - `int4-g32-e4g128`: int4 linears in groups of 32 and an int4 table (and output) in groups of 128: the
      table's scales shrink 4x while the linears keep g32's accuracy. 1B: 0.748 GB, at the release table's
      0.75 GB. A table whose rows do not split into 128s stays float (SmolLM2-135M, 576 wide); there a
      g64 table (`{"embedding_group_size": 64, ...}`) costs +10% perplexity, a g32 one +4%.
    - any int4 recipe + `-sym` (e.g. `int4-g32-e4g128-sym`): symmetric int4, w = (q - 8) * scale without
      zeros (`symmetric: true`), as in Meta's quantized Llama 3.2 and llama.cpp's Q4_0: 10% fewer bytes at
      group 32 (`int4-g32-e4g128-sym`: 1B 0.68 GB, 3B 1.79 GB; `int4-g64-e4-sym`: 3B 1.71 GB, under the
      release table's 1.75 GB), so decode, bound by memory, runs that much faster; it costs a little more
      accuracy than min/max (asymmetric) rounding.
    - any of these + `-v8` (e.g. `int4-g32-e4g128-v8`): Llama 3.2 Vision's encoder linears and projector
      int8 per row too (`vision: "int8"`); without it the vision tower stays as stored (11B: 1.8 GB bf16).
    """

    linear: Kind | None = None
    group_size: int | None = None  # int4 only: 32, 64, 128 or 256
    embedding: Kind | None = None
    lm_head: Kind | None = None
    embedding_group_size: int | None = None  # int4 token table / lm_head only; None = group_size
    vision: Literal["int8"] | None = None  # Llama 3.2 Vision encoder linears + projector
    symmetric: bool = False  # int4 without zeros: w = (q - 8) * scale

    def __post_init__(self) -> None:
        for field, value, allowed in (("linear", self.linear, ("int8", "int4")),
                                      ("embedding", self.embedding, ("int8", "int4")),
                                      ("lm_head", self.lm_head, ("int8", "int4")),
                                      ("vision", self.vision, ("int8",))):
            if value is not None and value not in allowed:
                raise ValueError(f"recipe field {field!r} is {value!r}; choose one of {allowed} or null")
        uses_int4 = "int4" in (self.linear, self.embedding, self.lm_head)
        if uses_int4 and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"recipe uses int4 but group_size is {self.group_size!r}; choose one of "
                             f"{INT4_GROUP_SIZES} (e.g. the recipe 'int4-g32')")
        if self.symmetric not in (True, False):
            raise ValueError(f"recipe field 'symmetric' is {self.symmetric!r}; choose true or false")
        if not uses_int4 and self.symmetric:
            raise ValueError("recipe symmetric applies to int4 weights (int8 is always symmetric); set linear, "
                             "embedding or lm_head to 'int4' or drop the field")
        if not uses_int4 and self.group_size is not None:
            raise ValueError(f"recipe group_size {self.group_size} applies to int4 only; int8 uses one scale "
                             "per output row")
        if self.embedding_group_size is not None:
            if "int4" not in (self.embedding, self.lm_head):
                raise ValueError(f"recipe embedding_group_size {self.embedding_group_size!r} applies to an int4 "
                                 f"token table or lm_head only, but embedding={self.embedding!r} and lm_head="
                                 f"{self.lm_head!r}; set embedding (and lm_head) to 'int4' or drop the field")
            if self.embedding_group_size not in INT4_GROUP_SIZES:
                raise ValueError(f"recipe embedding_group_size is {self.embedding_group_size!r}; choose one of "
                                 f"{INT4_GROUP_SIZES} or null (= group_size)")
            if self.embedding_group_size == self.group_size:  # one spelling per recipe: equal = unset
                object.__setattr__(self, "embedding_group_size", None)

    @property
    def table_group_size(self) -> int | None:
        """The int4 group size of the token table and the output projection."""
        return self.embedding_group_size or self.group_size

    @property
    def name(self) -> str:
        base = dataclasses.replace(self, vision=None)
        for name, recipe in NAMED_RECIPES.items():
            if recipe == base:
                return name + (VISION_SUFFIX if self.vision else "")
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """The dict recorded in config.json (`embedding_group_size`, `vision` and `symmetric` only when set, so
        recipes without them write what earlier versions wrote and read)."""
        d: dict[str, Any] = {"linear": self.linear, "group_size": self.group_size, "embedding": self.embedding,
                             "lm_head": self.lm_head, "version": FORMAT_VERSION}
        if self.embedding_group_size is not None:
            d["embedding_group_size"] = self.embedding_group_size
        if self.vision is not None:
            d["vision"] = self.vision
        if self.symmetric:
            d["symmetric"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        unknown = sorted(set(d) - {"linear", "group_size", "embedding", "lm_head", "embedding_group_size",
                                   "vision", "symmetric", "version"})
        if unknown:
            raise ValueError(f"quantization recipe has unknown key(s) {unknown}; known: linear, group_size, "
                             "embedding, lm_head, embedding_group_size, vision, symmetric")
        version = d.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"quantization format version {version} is not supported by this pocketllama "
                             f"(it reads version {FORMAT_VERSION}); upgrade pocketllama or re-quantize")
        return cls(linear=d.get("linear"), group_size=d.get("group_size"), embedding=d.get("embedding"),
                   lm_head=d.get("lm_head"), embedding_group_size=d.get("embedding_group_size"),
                   vision=d.get("vision"), symmetric=d.get("symmetric", False))

    def spec(self, module: str, shape: tuple[int, int], tied: bool) -> QSpec | None:
        """The storage of module `module` (HF name without `.weight`) with weight `shape` (out, in); None
        keeps it in floating point (not covered by the recipe, or int4 groups that do not fit its shape)."""
        kind_of = role(module)
        if kind_of == "vision":
            return QSpec("int8") if self.vision == "int8" else None
        if kind_of == "embedding" or (kind_of == "lm_head" and tied):
            if tied and self.lm_head != self.embedding:
                raise ValueError(
                    f"this model ties its embedding and output (one table), but the recipe sets embedding="
                    f"{self.embedding!r} and lm_head={self.lm_head!r}; set both to the same value (the recipe "
                    "'int4-g32-e4' has an int4 table, 'int4-g32' an int8 one)")
            if kind_of == "lm_head":  # a tied model has no output module of its own
                return None
            if self.embedding == "int4":  # a table has no row-block constraint: Int4Embedding never packs natively
                group = self.table_group_size
                return QSpec("int4", group, self.symmetric) if shape[1] % group == 0 else None
            return QSpec("int8") if self.embedding == "int8" else None
        kind = {"lm_head": self.lm_head, "linear": self.linear}.get(kind_of)
        if kind == "int8":
            return QSpec("int8")
        if kind == "int4":
            out_features, in_features = shape
            group = self.table_group_size if kind_of == "lm_head" else self.group_size
            if in_features % group or out_features % INT4_ROW_MULTIPLE:
                return None
            return QSpec("int4", group, self.symmetric)
        return None


NAMED_RECIPES: dict[str, Recipe] = {
    "int8": Recipe(linear="int8", embedding="int8", lm_head="int8"),
    **{f"int4-g{g}": Recipe(linear="int4", group_size=g, embedding="int8", lm_head="int8")
       for g in INT4_GROUP_SIZES},
    **{f"int4-g{g}-e4": Recipe(linear="int4", group_size=g, embedding="int4", lm_head="int4")
       for g in INT4_GROUP_SIZES},
    "int4-g32-e4g128": Recipe(linear="int4", group_size=32, embedding="int4", lm_head="int4",
                              embedding_group_size=128),
}
NAMED_RECIPES.update({f"{name}-sym": dataclasses.replace(r, symmetric=True)
                      for name, r in list(NAMED_RECIPES.items()) if r.linear == "int4"})


def parse_recipe(value: str | dict[str, Any] | Recipe) -> Recipe:
    """A recipe from its name (`int8`, `int4-g32`, ...), a dict, a JSON object string, or a Recipe."""
    if isinstance(value, Recipe):
        return value
    if isinstance(value, dict):
        return Recipe.from_dict(value)
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            return Recipe.from_dict(json.loads(value))
        except json.JSONDecodeError as e:
            raise ValueError(f"recipe {value!r} is not valid JSON: {e}") from None
    if isinstance(value, str) and value.lower() in NAMED_RECIPES:
        return NAMED_RECIPES[value.lower()]
    if isinstance(value, str) and value.lower().endswith(VISION_SUFFIX) and (
            base := value.lower()[: -len(VISION_SUFFIX)]) in NAMED_RECIPES:
        return dataclasses.replace(NAMED_RECIPES[base], vision="int8")
    raise ValueError(f"unknown quantization recipe {value!r}; choose one of {', '.join(NAMED_RECIPES)} "
                     f"(each optionally + {VISION_SUFFIX!r}: the vision encoder int8 too) "
                     "or give a dict like {\"linear\": \"int4\", \"group_size\": 32, \"embedding\": \"int8\", "
                     "\"lm_head\": \"int8\"}")


def role(module: str) -> Literal["embedding", "lm_head", "linear", "vision"] | None:
    """What a module is to a recipe: the token table, the output projection, a block linear, a vision
    encoder linear, or nothing."""
    if _VISION.fullmatch(module):
        return "vision"
    if _EMBEDDING.fullmatch(module):
        return "embedding"
    if _LM_HEAD.fullmatch(module):
        return "lm_head"
    return "linear" if _BLOCK_LINEAR.fullmatch(module) else None


def module_of(tensor_name: str) -> str | None:
    """`model.layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj` for quantizable weights, else None."""
    if not tensor_name.endswith(".weight"):
        return None
    module = tensor_name[: -len(".weight")]
    return module if role(module) is not None else None
