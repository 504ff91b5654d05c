"""Preference tuning with DPO (Rafailov et al. 2023): from pairs of answers to one prompt, the policy learns to
raise the chosen answer's likelihood against the rejected one's, measured relative to a frozen reference model.

    loss = -log sigmoid(beta [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

The reference is the starting model: under full finetuning a frozen copy of its weights (never checkpointed, so
a resumed run compares against the same start), under LoRA the base weights without the adapters. Its
log-probabilities are computed in each step from those frozen params.

Input: JSONL, one pair per line: `prompt` (a string, templated by the layout, or a list of chat messages),
`chosen` and `rejected` (strings, or lists ending with the assistant's message, as TRL writes conversational
pairs). Only the final answer's tokens (and its end-of-sequence token) count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import lora as lora_lib
from jaxlm import storage
from jaxlm.config import Experiment
from jaxlm.errors import DataError
from jaxlm.finetune.backbone import apply_model
from jaxlm.finetune.config import ADAPTERS_FILE, FinetuneConfig, Params
from jaxlm.finetune.data import (
    InstructSplit,
    encode_segments,
    fixed_batches,
    pack_rows,
    read_jsonl,
    template_segments,
)
from jaxlm.finetune.instruct import write_samples
from jaxlm.finetune.rundir import save_tree
from jaxlm.finetune.task import FinetuneTask
from jaxlm.train import fit

SIDES = ("chosen", "rejected")


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class PreferenceSplit:
    """Encoded pairs: token ids and 0/1 loss weights of each side, the prompts' segments and the chosen texts."""

    ids: dict[str, list[np.ndarray]]
    weights: dict[str, list[np.ndarray]]
    prompts: list[list[tuple[str, bool]]]
    chosen: list[str]
    truncated: int
    dropped: int
    layouts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, width: int, pad_id: int, order: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One row per side of each pair (in `order`): `<side>_inputs`, `_targets`, `_weights`, `_positions`,
        `_segment_ids`, and `valid` (1 per real pair)."""
        order = np.arange(len(self)) if order is None else order
        out: dict[str, np.ndarray] = {}
        for side in SIDES:
            rows = pack_rows([self.ids[side][i] for i in order], [self.weights[side][i] for i in order], width,
                             pad_id, pack=False)
            out.update({f"{side}_{k}": v for k, v in rows.items()})
        out["valid"] = np.ones(len(order), np.float32)
        return out


def _answer(value: Any, where: str, side: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        content = value[-1].get("content")
        if isinstance(content, str):
            return content
    raise DataError(f"{where}: field {side!r} must be a string or a list of messages ending with the assistant's")


def pair_segments(record: dict[str, Any], layout: str, where: str) -> tuple[str, dict[str, list[tuple[str, bool]]]]:
    """(the layout used, {side: [(text, counts in the loss)]}) of one preference record; only the answer counts."""
    for key in ("prompt", *SIDES):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r} (a preference pair: prompt, chosen, rejected)")
    prompt = record["prompt"]
    if layout == "auto":
        layout = "chat"
    if isinstance(prompt, list) and layout == "alpaca":
        raise DataError(f"{where}: a prompt of chat messages needs --finetune.layout chat (or auto)")
    if not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: field 'prompt' must be a string or a list of chat messages")
    out = {}
    for side in SIDES:
        answer = _answer(record[side], where, side)
        if layout == "alpaca":
            templated = {"instruction": prompt, "output": answer}
        else:
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            templated = {"messages": [*turns, {"role": "assistant", "content": answer}]}
        _, segments = template_segments(templated, layout, where)
        # Earlier assistant turns of the prompt are context: only the last segment, the answer, is trained.
        out[side] = [(text, False) for text, _ in segments[:-1]] + [(segments[-1][0], True)]
    return layout, out


def read_preferences(path: str, tokenizer: Any, ft: FinetuneConfig) -> PreferenceSplit:
    limit = ft.max_len + 1  # a row reads max_len tokens and predicts the next of each
    out = PreferenceSplit({s: [] for s in SIDES}, {s: [] for s in SIDES}, [], [], 0, 0, ())
    layouts = set()
    for line, record in read_jsonl(path):
        where = f"{path}:{line}"
        layout, segments = pair_segments(record, ft.layout, where)
        layouts.add(layout)
        encoded, cut = {}, False
        for side in SIDES:
            ids, weights = encode_segments(tokenizer, segments[side])
            if len(ids) > limit:
                if not ft.truncate:
                    raise DataError(
                        f"{where}: the {side} answer makes {len(ids)} tokens, longer than max_len+1={limit}: "
                        "raise --finetune.max-len or set --finetune.truncate"
                    )
                ids, weights, cut = ids[:limit], weights[:limit], True
            encoded[side] = (ids, weights)
        out.truncated += cut
        if any(sum(w[1:]) == 0 for _, w in encoded.values()):
            out.dropped += 1  # an answer was cut away entirely: nothing to compare
            continue
        for side, (ids, weights) in encoded.items():
            out.ids[side].append(np.asarray(ids, np.int32))
            out.weights[side].append(np.asarray(weights, np.float32))
        out.prompts.append(segments["chosen"][:-1])
        out.chosen.append(segments["chosen"][-1][0])
    if not out.prompts:
        raise DataError(f"{path}: every pair was longer than max_len={ft.max_len}: raise --finetune.max-len")
    out.layouts = tuple(sorted(layouts))
    return out


# ------------------------------------------------------------------------------------------------------ loss


def answer_logprobs(cfg, params: Params, batch, side: str, lora: Params | None = None, lora_spec=None, rng=None):
    """log p(answer | prompt) of each row of one side [B]: the sum of the counted targets' log-probabilities."""
    logits_BTV = apply_model(
        cfg, params, batch[f"{side}_inputs"], positions_BT=batch[f"{side}_positions"],
        segment_ids_BT=batch[f"{side}_segment_ids"], lora=lora, lora_spec=lora_spec, rng=rng,
    ).astype(jnp.float32)
    target_BT = jnp.take_along_axis(logits_BTV, batch[f"{side}_targets"][..., None], axis=-1)[..., 0]
    logp_BT = target_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
    return jnp.sum(logp_BT * batch[f"{side}_weights"], axis=1)


def dpo_terms(policy_logps: dict[str, jax.Array], reference_logps: dict[str, jax.Array], beta: float):
    """Per pair: the DPO loss, and the implicit rewards beta (log pi - log ref) of the chosen and rejected answers."""
    chosen = beta * (policy_logps["chosen"] - reference_logps["chosen"])
    rejected = beta * (policy_logps["rejected"] - reference_logps["rejected"])
    return jax.nn.softplus(rejected - chosen), chosen, rejected  # softplus(-m) = -log sigmoid(m)


class PreferenceTuning(FinetuneTask):
    """DPO against the frozen starting model. Trainable: the language model's params (all, or the last k blocks),
    with a frozen copy of the start as {"reference": params}; or with LoRA the adapters, beside {"model": params},
    which without the adapters are the reference."""

    def read_data(self) -> None:
        ft = self.ft
        self.splits = {"train": read_preferences(ft.train_file, self.tokenizer, ft)}
        for name, path in (("validation", ft.val_file), ("test", ft.test_file)):
            if path:
                self.splits[name] = read_preferences(path, self.tokenizer, ft)
        if jax.process_index() == 0:
            for name, data in self.splits.items():
                cut = f", {data.truncated} truncated to max_len={ft.max_len}" if data.truncated else ""
                dropped = f" ({data.dropped} dropped: an answer was cut away)" if data.dropped else ""
                print(f"{name}: {len(data)} preference pairs ({'/'.join(data.layouts)}){cut}{dropped}")
            print(f"trainable parameters: {self.count_trainable():,}; beta {ft.dpo_beta}")

    def abstract_params(self):
        backbone = self.boxed_backbone()
        if self.ft.lora is not None:
            return self.abstract_adapters(), {"model": backbone}
        return backbone, {"reference": backbone}

    def init_trainable(self, rng, shardings):
        if self.ft.lora is not None:
            return self.init_adapters(jax.random.fold_in(rng, 2), shardings)
        return self.place_backbone(shardings)

    def init_frozen(self, shardings):
        if self.ft.lora is not None:
            return {"model": self.place_backbone(shardings["model"])}
        # A copy of its own: the policy starts from the same weights, and its buffers are donated at every step
        # (a device_put of the same array could hand both the one buffer). The host copy stays for the policy.
        copy = jax.tree.map(lambda x, s: jax.device_put(np.array(x), s), self.base, shardings["reference"])
        return {"reference": copy}

    def update_mask(self):
        return self.backbone_mask()

    def epoch_rows(self, epoch):
        data = self.splits["train"]
        order = np.random.default_rng([self.experiment.train.seed, epoch]).permutation(len(data))
        return data.rows(self.ft.max_len, self.tokenizer.pad_id, order)

    def _policy_and_reference(self, params, frozen):
        """((model params, adapters or None), reference params)."""
        if self.ft.lora is not None:
            return (frozen["model"], params), frozen["model"]
        return (params, None), frozen["reference"]

    def terms(self, params, frozen, batch, rng=None):
        (model, adapters), reference = self._policy_and_reference(params, frozen)
        cfg, spec = self.experiment.model, self.ft.lora
        rng = rng if self.uses_dropout() else None
        policy, ref = {}, {}
        for i, side in enumerate(SIDES):
            side_rng = None if rng is None else jax.random.fold_in(rng, i)
            policy[side] = answer_logprobs(cfg, model, batch, side, adapters, spec, side_rng)
            ref[side] = jax.lax.stop_gradient(answer_logprobs(cfg, reference, batch, side))
        return (*dpo_terms(policy, ref, self.ft.dpo_beta), ref["chosen"] > ref["rejected"])

    def loss(self, params, frozen, batch, rng):
        losses, _, _, _ = self.terms(params, frozen, batch, rng)
        valid = batch["valid"]
        return jnp.sum(losses * valid), jnp.sum(valid)

    def eval_batches(self):
        if "validation" not in self.splits:
            return iter(())
        return self.split_batches(self.splits["validation"].rows(self.ft.max_len, self.tokenizer.pad_id), "valid")

    def eval_sums(self, params, frozen, batch):
        losses, chosen, rejected, reference_prefers = self.terms(params, frozen, batch)
        valid = batch["valid"]
        return {
            "loss": jnp.sum(losses * valid), "count": jnp.sum(valid),
            "correct": jnp.sum((chosen > rejected) * valid), "margin": jnp.sum((chosen - rejected) * valid),
            "chosen": jnp.sum(chosen * valid), "rejected": jnp.sum(rejected * valid),
            "reference_correct": jnp.sum(reference_prefers * valid),
        }

    def eval_row(self, sums):
        """DPO's figures; `val_reference_accuracy` is how often the reference alone already gives the chosen
        answer the higher likelihood: the bar a policy's reward accuracy is to be read against."""
        n = max(sums["count"], 1.0)
        return {
            "val_loss": sums["loss"] / n, "val_reward_accuracy": sums["correct"] / n, "val_margin": sums["margin"] / n,
            "val_chosen_reward": sums["chosen"] / n, "val_rejected_reward": sums["rejected"] / n,
            "val_reference_accuracy": sums["reference_correct"] / n,
        }

    def split_figures(self, sums_fn, params, frozen, data: PreferenceSplit) -> dict[str, float]:
        """The eval_row figures of a whole split, without the val_ prefix."""
        totals: dict[str, float] = {}
        rows = data.rows(self.ft.max_len, self.tokenizer.pad_id)
        for batch, real in fixed_batches(rows, self.experiment.data.batch_size):
            batch["valid"][real:] = 0.0
            for key, value in jax.device_get(sums_fn(params, frozen, batch)).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return {k.removeprefix("val_"): v for k, v in self.eval_row(totals).items()}

    def finish(self, params, frozen, summary):
        run_dir, ft = self.experiment.run_dir, self.ft
        out: dict[str, Any] = {
            "task": "dpo", "layouts": list(self.splits["train"].layouts), "beta": ft.dpo_beta,
            "trainable_params": self.count_trainable(),
        }
        sums_fn = jax.jit(self.eval_sums)
        for name, data in self.splits.items():
            figures = self.split_figures(sums_fn, params, frozen, data)
            out[name] = figures
            print(f"{name}: reward accuracy {figures['reward_accuracy']:.3f} (the reference alone prefers the chosen "
                  f"answer in {figures['reference_accuracy']:.3f}), margin {figures['margin']:.3f}, "
                  f"loss {figures['loss']:.4f}")
        (model, adapters), _ = self._policy_and_reference(params, frozen)
        if ft.lora is not None:
            save_tree(storage.join(run_dir, ADAPTERS_FILE), adapters)
            model = lora_lib.merge(model, adapters, ft.lora)
        source = self.splits.get("validation", self.splits["train"])
        samples = InstructSplit([], [], source.prompts, source.chosen, 0, 0, source.layouts)
        out["samples"] = write_samples(
            self.experiment, model, self.tokenizer, samples, ft, storage.join(run_dir, "samples.txt")
        )
        return out


def train_dpo(experiment: Experiment, ft: FinetuneConfig) -> dict[str, Any]:
    """Preference-tune a language model with DPO; returns the summary (also written to summary.json)."""
    return fit(PreferenceTuning(experiment, ft))
