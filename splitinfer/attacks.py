"""Leakage attacks: what an adversary who controls the GPU learns about the prompt from what crossed.

An attack sees only what an untrusted GPU sees: the audit records (every tensor sent to it, labelled
with layer and op, as `splitinfer.audit.read_audit` returns them) and the public model (config,
weights, tokenizer). It never sees masks, pads, ids or any other TEE state, so this module imports
nothing from the engine or the schemes. Each attack returns, per sequence, its guess of the tokens;
the evaluation scores the guesses against the truth, which the attacks never see.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from splitinfer.reference import build_transformers_model
from splitinfer.tee_ops import Rotary, apply_rope

CHUNK = 2048  # candidate tokens per batch when running the public model


@dataclass
class PublicModel:
    """The public weights, and per layer the input each vocabulary token would give that layer's q/k/v
    projection as a one-token prompt: the attacker's dictionary of candidates."""

    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    _tables: dict[int, torch.Tensor] = field(default_factory=dict)
    _projections: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    _query_profiles: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def candidates(self, layer: int) -> torch.Tensor:
        """[vocab, d]: RMSNorm'd layer-`layer` input of every token alone (exact at layer 0; later layers
        lack the context of the other tokens, so they only approximate what a prompt produces)."""
        if layer not in self._tables:
            self._tables.update(self._compute_tables(layer))
        return self._tables[layer]

    def queries(self, layer: int, position: int) -> torch.Tensor:
        """[vocab, H, h]: the rotated q of every token alone, as if it stood at `position`."""
        q = self._project(layer, "q_proj", self.config.num_attention_heads)
        cos, sin = Rotary(self.config).tables(position + 1, torch.float32)
        return apply_rope(q.transpose(0, 1), cos[position], sin[position]).transpose(0, 1)

    def query_profiles(self, layer: int, position: int) -> torch.Tensor:
        """[vocab, H, h] profiles (see `_profiles`) of `queries`, kept (in float16) for the next prompt."""
        if (layer, position) not in self._query_profiles:
            self._query_profiles[(layer, position)] = _profiles(self.queries(layer, position)).half()
        return self._query_profiles[(layer, position)]

    def _project(self, layer: int, name: str, heads: int) -> torch.Tensor:
        if (layer, name) not in self._projections:
            weight = self.state_dict[f"model.layers.{layer}.self_attn.{name}.weight"].float()
            out = self.candidates(layer) @ weight.T
            bias = self.state_dict.get(f"model.layers.{layer}.self_attn.{name}.bias")
            if bias is not None:
                out = out + bias.float()
            self._projections[(layer, name)] = out.view(out.shape[0], heads, -1)
        return self._projections[(layer, name)]

    def values(self, layer: int = 0) -> torch.Tensor:
        """[vocab, Hkv, h]: the v-projection of every token alone at `layer`."""
        return self._project(layer, "v_proj", self.config.num_key_value_heads)

    @torch.no_grad()
    def _compute_tables(self, up_to: int) -> dict[int, torch.Tensor]:
        config = LlamaConfig.from_dict({**self.config.to_dict(), "num_hidden_layers": up_to + 1})
        model = build_transformers_model(config, self.state_dict)
        tables: dict[int, list[torch.Tensor]] = defaultdict(list)
        for start in range(0, config.vocab_size, CHUNK):
            ids = torch.arange(start, min(start + CHUNK, config.vocab_size))[:, None]
            hidden = model.model(input_ids=ids, output_hidden_states=True).hidden_states
            for layer in range(up_to + 1):
                tables[layer].append(model.model.layers[layer].input_layernorm(hidden[layer])[:, 0])
        return {layer: torch.cat(parts) for layer, parts in tables.items()}


def crossings(records: list[dict], op: str, layer: int | None, occurrence: int = 0) -> torch.Tensor | None:
    """The `occurrence`-th tensor sent to the GPU for `op` at `layer`, or None."""
    found = [r["tensor"] for r in records if r["op"] == op and r["layer"] == layer]
    return found[occurrence] if occurrence < len(found) else None


def sent_queries(records: list[dict], model: PublicModel, layer: int) -> torch.Tensor | None:
    """The q the GPU receives at `layer`: the first heads of the first matmul operand (the plain split sends
    q and k as one tensor, the masked schemes each alone)."""
    q = crossings(records, "matmul", layer, occurrence=0)
    return None if q is None else q[:, : model.config.num_attention_heads]


def nearest(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the table row with the largest |cosine| to each row."""
    sims = F.normalize(rows.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T
    return sims.abs().argmax(dim=-1)


def remove_shared_directions(rows: torch.Tensor, table: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Project the top-k right singular vectors of `rows` out of the rows and out of the table.

    A token mixing M = D + ABᵀ makes every masked row d_i·x_i plus a combination of the k shared
    vectors BᵀX; those dominate the rows' spectrum, and removing them leaves d_i·x_i minus a small part."""
    _, _, vh = torch.linalg.svd(rows.float(), full_matrices=False)
    basis = vh[:k]
    return rows - (rows @ basis.T) @ basis, table - (table @ basis.T) @ basis


# ---- the attacks: each maps (audit records of one inference, public model) -> guessed ids [B, n] ----

def ids_in_clear(records: list[dict], model: PublicModel, layer: int = 0) -> torch.Tensor | None:
    """The plain split sends the token ids themselves for the GPU's embedding lookup."""
    ids = crossings(records, "embedding", None)
    return None if ids is None else ids.long()


def naive_match(records: list[dict], model: PublicModel, layer: int = 0) -> torch.Tensor | None:
    """Each row of the q/k/v projection's input at `layer`, matched to the nearest candidate token."""
    x = crossings(records, "linear_attn", layer)
    if x is None:
        return None
    return nearest(x.reshape(-1, x.shape[-1]), model.candidates(layer)).view(x.shape[:-1])


def shared_direction(records: list[dict], model: PublicModel, layer: int = 0, k: int = 1) -> torch.Tensor | None:
    """Per sequence, remove the k shared mixing directions from the rows and the candidates, then match."""
    x = crossings(records, "linear_attn", layer)
    if x is None or x.dim() != 3:
        return None
    guesses = []
    for sequence in x.float():
        rows, table = remove_shared_directions(sequence, model.candidates(layer), k)
        guesses.append(nearest(rows, table))
    return torch.stack(guesses)


def _profiles(x: torch.Tensor) -> torch.Tensor:
    """Each row's sorted |entries| at unit norm: unchanged by permuting or flipping the signs of its entries."""
    return F.normalize(x.float().abs().sort(dim=-1).values, dim=-1)


def query_profile(records: list[dict], model: PublicModel, layer: int = 0) -> torch.Tensor | None:
    """Against ours' Q' = D₁P₁ Q P₂D₂ (rows of each head in a secret order, entries permuted and rescaled):
    match each row's profile against every (token, position) candidate's rotated q of the same head.
    Guesses are a multiset per head; head by head, since every head has its own row order."""
    q = sent_queries(records, model, layer)
    if q is None:
        return None
    batch, heads, n, _ = q.shape
    guesses = torch.empty(batch, heads, n, dtype=torch.long)
    best = torch.full((batch, heads, n), -2.0)
    for position in range(n):
        table = model.query_profiles(layer, position)  # [vocab, H, h]
        for h in range(heads):
            sims = _profiles(q[:, h]) @ table[:, h].float().T  # [B, n, vocab]
            score, token = sims.max(dim=-1)
            better = score > best[:, h]
            best[:, h][better], guesses[:, h][better] = score[better], token[better]
    return guesses.reshape(batch * heads, n)


def query_match(records: list[dict], model: PublicModel, layer: int = 0) -> torch.Tensor | None:
    """q rows in place (otp sends Q − R₁, each row at its own position): nearest rotated candidate q."""
    q = sent_queries(records, model, layer)
    if q is None:
        return None
    batch, heads, n, head_dim = q.shape
    guesses = torch.empty(batch, n, dtype=torch.long)
    for position in range(n):
        table = model.queries(layer, position).reshape(-1, heads * head_dim)
        guesses[:, position] = nearest(q[:, :, position].reshape(batch, -1), table)
    return guesses


def value_profile(records: list[dict], model: PublicModel, layer: int = 0) -> torch.Tensor | None:
    """Against permuted and rescaled v rows (ours: D₂⁻¹P₂⁻¹ V P₃D₃): each row's sorted |entries|, scaled to
    unit norm, is unchanged by a column permutation and by sign flips; match it to the candidates'.
    Rows come in a secret order, so the guesses are a multiset (the evaluation scores them as one)."""
    v = crossings(records, "matmul", layer, occurrence=3)  # scores: q, kᵀ; attend: probabilities, v
    if v is None:
        return None
    batch, groups, n, head_dim = v.shape
    table = model.values(layer)  # [vocab, Hkv, h]
    guesses = torch.empty(batch, groups, n, dtype=torch.long)
    for g in range(groups):
        guesses[:, g] = (_profiles(v[:, g]) @ _profiles(table[:, g]).T).argmax(dim=-1)
    return torch.mode(guesses, dim=1).values  # the groups' majority vote per row


def value_match(records: list[dict], model: PublicModel, layer: int = 0) -> torch.Tensor | None:
    """v rows in place (otp sends V − R₂ at its own positions): nearest candidate v, concatenated over heads."""
    v = crossings(records, "matmul", layer, occurrence=3)
    if v is None:
        return None
    batch, groups, n, head_dim = v.shape
    rows = v.float().permute(0, 2, 1, 3).reshape(batch * n, groups * head_dim)
    return nearest(rows, model.values(layer).reshape(model.values(layer).shape[0], -1)).view(batch, n)


ATTACKS = {"ids_in_clear": ids_in_clear, "naive_match": naive_match, "shared_direction": shared_direction,
           "query_profile": query_profile, "query_match": query_match,
           "value_profile": value_profile, "value_match": value_match}
POSITIONAL = {"ids_in_clear", "naive_match", "shared_direction", "query_match", "value_match"}  # token order kept


def recovery_rate(guess: torch.Tensor, truth: torch.Tensor, positional: bool) -> int:
    """How many tokens the guess gets right: position by position, or as a multiset where the rows are
    permuted."""
    if positional:
        return int((guess.reshape(truth.shape) == truth).sum())
    hits = 0
    for g, t in zip(guess.reshape(truth.shape[0], -1), truth):
        counts = torch.bincount(t)
        guessed = torch.bincount(g, minlength=len(counts))[: len(counts)]
        hits += int(torch.minimum(counts, guessed).sum())
    return hits
