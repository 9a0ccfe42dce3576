"""Tiny random causal LMs with a tiny trained tokenizer, for tests and quick trials. No downloads.

python tests/tiny_models.py OUT_DIR [--family llama|gpt2|gpt_neox] [--imdb ../shared/data/imdb]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def train_tokenizer(texts: list[str], out: Path) -> Path:
    """A byte-level BPE tokenizer (vocab 600) trained on ``texts``, saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        list(texts) + ["Sentiment: positive", "Sentiment: negative"] * 50, trainer
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(out)
    return out


FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "opt",
)


def tiny_config(family: str, vocab: int, n_layers: int = 2):
    """A config of ``family`` with 4 query heads; GQA, head_dim != hidden/heads, parallel blocks
    and sliding-window layers where the family has them."""
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        max_position_embeddings=1024,
    )
    if family == "llama":  # 4 query heads, 2 KV heads, head_dim 8
        return tf.LlamaConfig(**common, num_key_value_heads=2)
    if family == "mistral":
        return tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=16)
    if family == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2)
    if family == "qwen3":  # head_dim 16: the o_proj input (64) is wider than the hidden size (32)
        return tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=16)
    if family == "gemma2":  # head_dim 16, alternating sliding/global layers, logit soft-capping
        return tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=16)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=16, sliding_window=16)
    if family == "phi3":  # fused qkv_proj before o_proj
        return tf.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0)
    if family == "gpt2":  # Conv1D c_proj, weight stored (in, out)
        return tf.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=n_layers, n_head=4, n_positions=1024
        )
    if family == "gpt_neox":  # attention and MLP in parallel
        return tf.GPTNeoXConfig(**common, use_parallel_residual=True)
    if family == "opt":
        return tf.OPTConfig(
            vocab_size=vocab,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            max_position_embeddings=1024,
            word_embed_proj_dim=32,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(f"family {family!r} is not allowed; allowed: {', '.join(FAMILIES)}")


def build_tiny_model(
    folder: Path, tokenizer_dir: Path, family: str = "llama", seed: int = 0, n_layers: int = 2
) -> Path:
    """Save a tiny random causal LM of ``family`` with the tokenizer of ``tokenizer_dir``."""
    import torch
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), n_layers))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def head_slice(site, head: int) -> slice:
    """Head ``head``'s columns of the o_proj input."""
    return slice(head * site.head_dim, (head + 1) * site.head_dim)


def projection_weight(model, site):
    """The projection weight as (out_features, in_features), whatever its storage."""
    weight = model.get_submodule(site.module_name).weight
    return weight.T if site.transposed else weight


def edit_of(
    model,
    site,
    head,
    kind="noise",
    *,
    where="o_proj_input",
    scale=4.0,
    repeats=3,
    seed=5,
    clean=None,
    position="all",
):
    """The :class:`headperturb.model.hooks.Edit` of a perturbation ``kind`` on ``head`` of
    ``site``, as a job builds it (``clean``: the head's clean outputs, for mean and resample)."""
    from headperturb.core import kinds
    from headperturb.model.hooks import Edit, site_slice

    cols = site_slice(model, site, head, where)
    pert = kinds.build(kind, scale if kind == "noise" else None)
    if kind == "noise":
        pert = pert.resolve()
    values = pert.values(
        seed=seed,
        layer=site.layer,
        head=head,
        width=cols.stop - cols.start,
        repeats=repeats,
        clean=clean,
    )
    return Edit(site, head, where, values, pert.apply, pert.draws(repeats), position)


def untouched(model, ids, before) -> None:
    """Assert the model gives the logits ``before`` on ``ids[0]`` again: no hook was left on it."""
    import torch

    with torch.no_grad():
        after = model(input_ids=torch.as_tensor(ids[0])[None]).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def run_step(rule_step, *, input=None, output=None, params=None, wildcards=None, threads=1):
    """Run a workflow step (:mod:`headperturb.workflow.steps`) as its rule would, with plain
    namespaces in place of Snakemake's input, output, params and wildcards."""
    from types import SimpleNamespace

    def ns(values):
        return SimpleNamespace(**(values or {}))

    return rule_step.step(ns(input), ns(output), ns(params), ns(wildcards), threads)


def model_params(device="cpu", dtype="float32", site=None) -> dict:
    """The params every model step takes (``device``, ``dtype``, ``site``)."""
    return {"device": device, "dtype": dtype, "site": site}


def capture_io(model, name: str, ids):
    """The input and output of module ``name`` in a forward pass over ``ids``."""
    import torch

    seen = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda _m, args, out: seen.update(x=args[0].clone(), y=out.clone())
    )
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen["x"], seen["y"]


def main() -> None:
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", default="llama")
    parser.add_argument(
        "--imdb", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/imdb"
    )
    args = parser.parse_args()
    texts = pd.read_parquet(args.imdb / "train.parquet")["text"].sample(400, random_state=0)
    tok_dir = train_tokenizer(list(texts), args.out / "tokenizer")
    build_tiny_model(args.out, tok_dir, args.family)
    print(args.out)


if __name__ == "__main__":
    main()


def sentiment_prompts(
    train,
    test,
    tok,
    *,
    k_shot: int,
    n_test: int,
    max_review_tokens: int,
    context_length: int = 1024,
):
    """``build_prompts`` with the default run's template, verbalizers and separator, seed 0."""
    from headperturb.data.prompts import build_prompts

    return build_prompts(
        train,
        test,
        tok,
        k_shot=k_shot,
        n_test=n_test,
        max_review_tokens=max_review_tokens,
        template="Review: {text}\nSentiment: {label}",
        verbalizers=(" negative", " positive"),
        separator="\n\n",
        seed=0,
        context_length=context_length,
    )
