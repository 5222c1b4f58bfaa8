"""Make a Hugging Face model's ``config`` describe the smaller model deploy made, so ``save_pretrained`` → the stock
``AutoModelFor….from_pretrained`` rebuilds it.

Per kind of unit, the config keys that state it (as the architectures name them): heads ``num_attention_heads`` (and
``num_heads``, ``n_head``, ``n_heads``), key/value heads ``num_key_value_heads``, ``head_dim``; MLP width
``intermediate_size``, ``moe_intermediate_size``, ``shared_expert_intermediate_size``, ``ffn_dim``,
``encoder_ffn_dim``, ``decoder_ffn_dim``, ``n_inner``, ``hidden_dim``, ``d_ff``. A key is rewritten only where it held the layers' original count and every layer it describes kept the
same number of units (``distribution="uniform"``). Then the claim is **checked**: the model class is built from the
new config on the meta device (no memory, no weights) and every tensor of the changed layers must have the shape the
deployed model holds. Where it does not (GPT-2, OPT, BERT and GPT-NeoX derive ``head_dim`` from ``hidden / heads``,
so fewer heads of the same width are not expressible; layers that kept different counts), the config is left as it
was and a note says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

HEAD_KEYS = ("num_attention_heads", "num_heads", "n_head", "n_heads")
KV_KEYS = ("num_key_value_heads",)
MLP_KEYS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_dim", "encoder_ffn_dim",
            "decoder_ffn_dim", "n_inner", "hidden_dim", "d_ff")


@dataclass(frozen=True)
class Resized:
    """One group layer after deploy: its module, kind, units before/after, query heads per unit, unit width."""

    module: str
    kind: str
    before: int
    after: int
    query_heads: int = 1
    width: int = 1
    params: tuple[str, ...] = ()
    kv_heads: int = 0  # query-slot units: the KV heads all kept


def _config_owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost modules that hold a Hugging Face config (``config.to_dict``) and can be built from it."""
    owners: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "to_dict") or not hasattr(type(module), "from_pretrained"):
            continue
        if any(name == o or name.startswith(o + ".") if o else True for o, _ in owners):
            continue
        owners.append((name, module))
    return owners


def _relative(name: str, prefix: str) -> str | None:
    if not prefix:
        return name
    return name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None


def _changes(config: object, rows: Sequence[Resized]) -> tuple[dict[str, int], list[str]]:
    """``{key: new value}`` for this config, and why a key could not be set."""
    wanted: dict[str, set[int]] = {}
    problems = []
    for row in rows:
        if row.kind == "head" and row.kv_heads:
            pairs = [(k, row.before * row.kv_heads, row.after * row.kv_heads) for k in HEAD_KEYS]
        elif row.kind == "head":
            pairs = [(k, row.before * row.query_heads, row.after * row.query_heads) for k in HEAD_KEYS]
            pairs += [(k, row.before, row.after) for k in KV_KEYS]
        else:
            pairs = [(k, row.before, row.after) for k in MLP_KEYS]
        hit = False
        for key, old, new in pairs:
            value = getattr(config, key, None)
            if value == old or (key == "n_inner" and value is None and getattr(config, "n_embd", 0) * 4 == old):
                wanted.setdefault(key, set()).add(new)
                hit = True
        if not hit:
            problems.append(f"{row.module}: no config key holds its {row.before} {row.kind}s")
    changes = {}
    for key, values in wanted.items():
        if len(values) > 1:
            problems.append(f"layers kept different numbers of units ({sorted(values)}) for `{key}`, which one value must "
                            f"describe (prune with distribution='uniform' to save a standard config)")  # fmt: skip
        else:
            changes[key] = values.pop()
    if changes and any(r.kind == "head" for r in rows):
        widths = {r.width for r in rows if r.kind == "head"}
        if len(widths) == 1:
            changes["head_dim"] = widths.pop()  # Llama/Qwen/Mistral/Gemma/Phi-3/ViT read it instead of hidden / heads
    return changes, problems


def _check(owner: nn.Module, prefix: str, rows: Sequence[Resized]) -> str | None:
    """Why the class built from the owner's config would not hold the deployed shapes (None: it would)."""
    try:
        with torch.device("meta"):
            fresh = type(owner)(owner.config)
    except Exception as error:  # a class that cannot be built from its config alone
        return f"{type(owner).__name__}(config) could not be built to check it ({type(error).__name__}: {error})"
    shapes = {name: tuple(t.shape) for name, t in fresh.state_dict().items()}
    state = owner.state_dict()
    for row in rows:
        for param in row.params:
            name = _relative(param, prefix)
            if name is not None and name in state and shapes.get(name) != tuple(state[name].shape):
                return f"{name} would be {list(shapes.get(name, ()))} from the config but is {list(state[name].shape)}"
    return None


def update_configs(model: nn.Module, rows: Sequence[Resized]) -> list[str]:
    """Rewrite the Hugging Face configs in ``model`` to describe the layers ``rows`` resized (see the module doc; give
    every group layer, those that kept all their units too, so that one key is not set for layers it does not
    describe); return notes for the deploy report (what was set, or why the config cannot express the model)."""
    notes = []
    for prefix, owner in _config_owners(model):
        mine = [r for r in rows if _relative(r.module, prefix) is not None]
        for kind in ("neuron", "head"):
            subset = [r for r in mine if r.kind == kind]
            if not any(r.after != r.before for r in subset):
                continue  # the layers that kept every unit are in `subset`: one key must describe them too
            what = "MLP width" if kind == "neuron" else "attention heads"
            changes, problems = _changes(owner.config, subset)
            if problems or not changes:
                notes.append(f"the config of {prefix or type(owner).__name__} cannot express the deployed {what}: "
                             f"{'; '.join(problems) or 'no key describes them'}; `save_pretrained` would not reload it "
                             f"with the stock `from_pretrained`")  # fmt: skip
                continue
            before = {key: getattr(owner.config, key, None) for key in changes}
            had = {key: hasattr(owner.config, key) for key in changes}
            for key, value in changes.items():
                setattr(owner.config, key, value)
            why = _check(owner, prefix, subset)
            if why is None:
                notes.append(f"config of {prefix or type(owner).__name__} updated for its {what}: "
                             + ", ".join(f"{k} {before[k]} → {v}" for k, v in changes.items()))  # fmt: skip
                continue
            for key in changes:
                if had[key]:
                    setattr(owner.config, key, before[key])
                else:
                    delattr(owner.config, key)
            notes.append(f"the config of {prefix or type(owner).__name__} cannot express the deployed {what} ({why}; "
                         f"{type(owner.config).__name__} derives the shape from other keys): left unchanged, so "
                         f"`save_pretrained` would not reload with the stock `from_pretrained`")  # fmt: skip
    return notes
