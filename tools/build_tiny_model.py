"""Build the tiny random ChatML LLM used as a test fixture, exported to OpenVINO IR.

What it builds
    A ~0.4 MB, randomly initialised ``Qwen2ForCausalLM`` (hidden 64, 2 layers,
    4 heads, 2 KV heads) with a byte-level BPE tokenizer (529 tokens) trained
    here on a few KB of English text, special tokens ``<|endoftext|>``,
    ``<|im_start|>``, ``<|im_end|>`` (eos = ``<|im_end|>``) and a ChatML chat
    template.  It is exported with optimum-intel to OpenVINO IR
    (``openvino_model.xml/.bin``, int4 weights) plus OpenVINO tokenizer and
    detokenizer IR that carry the chat template in their rt_info.

Why
    The tests run the real ``openvino_genai.LLMPipeline`` on CPU.  They must
    not download anything and must stay fast, so they use this tiny model,
    committed in ``tests/fixtures/tiny-chatml-ov/``.  Its text is meaningless,
    but the logits are biased so that greedy output is printable ASCII and
    never contains a special token: free generation always runs to
    ``max_new_tokens``, and JSON-schema-constrained generation usually closes
    its JSON within 40-60 tokens.
    At runtime only ``openvino-genai`` is needed; torch, transformers and
    optimum are build-time tools only and live in a separate venv.

Set up the build venv (once; fully offline apart from the package registry)
    python3 -m venv /opt/tinybuild
    /opt/tinybuild/bin/pip install \\
        /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \\
        "transformers<5.6" "optimum-intel[openvino]==2.2.0" nncf tokenizers \\
        "openvino==2026.4.1" "openvino-tokenizers==2026.4.1.*"
    /opt/tinybuild/bin/pip uninstall -y torchvision

    Pass the CPU torch wheel in the same pip command: otherwise the
    torchvision that optimum-intel pulls in upgrades torch to a CUDA build
    (GBs of nvidia-* wheels).  torchvision is then removed: it is not needed,
    and the registry's build fails against the +cpu torch ("operator
    torchvision::nms does not exist"), which breaks transformers' model
    imports.  openvino and openvino-tokenizers are pinned to the runtime's
    version so the tokenizer IR matches what openvino-genai 2026.4.1 expects.

Run
    /opt/tinybuild/bin/python tools/build_tiny_model.py tests/fixtures/tiny-chatml-ov

The output is byte-for-byte reproducible (fixed seed, no paths or timestamps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers
from transformers import GenerationConfig
from transformers import PreTrainedTokenizerFast
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# The corpus below is small, so BPE runs out of pairs seen twice first and the
# vocabulary ends up at 529 tokens.
TARGET_VOCAB_SIZE = 768
SEED = 0

# See build_model() and token_biases(): a hidden channel that is constant for
# every token, through which lm_head adds a per-token bias to the logits.
BIAS_CHANNEL = 0
BIAS_CHANNEL_VALUE = 0.05
BANNED_BIAS = -20.0
WHITESPACE_BIAS = -10.0
# Nudges that make JSON-constrained output complete with at least one item:
# strings get closed now and then (so '"' also shows up in free text, ~7% of
# tokens), and after '[' the model opens an object rather than closing the
# empty array.  ',' and ']' share a bias, so after an item the random weights
# decide between them (in practice: ']').
TOKEN_BIASES = {b'"': 4.0, b"]": -5.0, b",": -5.0}

# ChatML, as used by Qwen2: every message is framed by im_start/im_end, and
# the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Files that openvino_genai.LLMPipeline reads (plus the small HF config and
# tokenizer files, kept so the fixture stays self-describing).  Everything
# else optimum writes (e.g. the HF weights) is left out.
KEEP_FILES = [
    "config.json",
    "generation_config.json",
    "openvino_config.json",
    "openvino_model.xml",
    "openvino_model.bin",
    "openvino_tokenizer.xml",
    "openvino_tokenizer.bin",
    "openvino_detokenizer.xml",
    "openvino_detokenizer.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
]

README = """\
# tiny-chatml-ov

A tiny, randomly initialised chat LLM in OpenVINO IR, used by the tests to run
the real `openvino_genai.LLMPipeline` on CPU without downloading a model.

- Model: `Qwen2ForCausalLM`, hidden 64, 2 layers, 4 heads / 2 KV heads,
  int4 weights (random, seed 0).
- Tokenizer: byte-level BPE (529 tokens) trained on a few KB of English text,
  with `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (eos) and a ChatML chat
  template (also in the OpenVINO tokenizer's rt_info).
- Behaviour: output is meaningless but printable ASCII (sometimes with `"`),
  greedy decoding is deterministic, and the model never emits `<|im_end|>`, so
  free generation always runs to `max_new_tokens`. With a JSON schema
  (structured output) it usually closes the JSON within 40-60 tokens, with one
  array item.

Generated, do not edit by hand. Rebuild (build venv setup is in the script's docstring):

    /opt/tinybuild/bin/python tools/build_tiny_model.py tests/fixtures/tiny-chatml-ov
"""

# Training text for the tokenizer.  Plain English so that the merges produce
# word-like tokens; its content does not matter otherwise.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small boat sails across the quiet lake at dawn.
Every morning the baker opens the shop, lights the oven and bakes fresh bread for the village.
Children walk to school along the river, talking about games, books and the weekend.
The old library has tall windows, wooden shelves and a reading room that smells of paper.
In the garden there are roses, tomatoes, beans and a cherry tree that blooms in spring.
She wrote a short letter to her brother and asked him to visit before the end of summer.
The train leaves the station at seven and arrives in the city just after nine o'clock.
Good titles are short, clear and specific. They tell the reader what the text is about.
Write a title for this note. Summarise the meeting in one line. Suggest three names for the project.
How to plan a trip on a budget. Ten simple recipes for busy weeknights. Notes from a walk in the hills.
A guide to keeping house plants alive. Why sleep matters for memory. The history of the bicycle.
Weekly update: the team fixed two bugs, reviewed the design and started work on the new search page.
Meeting notes: we agreed to release the first version next month and to collect feedback from users.
Please remember to bring the report, the slides and a list of open questions to the review.
The weather was cold and windy, so we stayed inside, made tea and played cards until late.
He fixed the broken chair, painted the fence and cleaned the windows before the guests arrived.
Music filled the hall as the orchestra played an old song that everyone seemed to know.
A new study shows that regular exercise improves mood, focus and the quality of sleep.
The market sells apples, pears, cheese, honey, fresh fish and bread baked the same day.
Our company builds tools that help people write, search and organise their documents.
The mountain road is narrow and steep, with sharp turns and a fine view of the valley.
When the lights went out, the whole street was dark and quiet except for a barking dog.
The museum opens a new exhibition about maps, ships and the explorers who sailed them.
Thank you for your message. I will look into the problem and reply by the end of the day.
Hello world! This is a simple example of text that a small model might be asked to title.
Dear team, the office will be closed on Friday. Please plan your work and deadlines accordingly.
The recipe needs two eggs, a cup of flour, some milk, a pinch of salt and a little sugar.
Lists, numbers and dates: 1, 2, 3, 10, 42, 100, 2024, 2025; first, second, third; Monday to Sunday.
Questions? Answers! Quotes: "yes", 'no'; brackets (like this) [or this] {and this}; a - b + c = d.
Six boxes of zinc jars were quickly packed by the expert worker; jazz and extra vex are examples.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode mapping used by byte-level BPE vocabularies."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on CORPUS and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,  # ids 0, 1, 2
        # All 256 bytes, so any input text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def token_biases(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Per-token logit bias that keeps greedy output printable and never-ending.

    - special tokens, control bytes and non-ASCII bytes (alone, invalid UTF-8):
      BANNED_BIAS, so they are never picked, in particular not EOS;
    - tokens made only of spaces: WHITESPACE_BIAS, so that under a JSON grammar
      the model writes structure instead of the optional whitespace forever;
    - a few JSON punctuation tokens: TOKEN_BIASES;
    - everything else (printable ASCII): 0.
    """
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    special_ids = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    bias = torch.zeros(len(tokenizer))
    for token, idx in tokenizer.get_vocab().items():
        raw = bytes(byte_of[ch] for ch in token) if idx not in special_ids else b""
        if idx in special_ids or not all(0x20 <= b <= 0x7E for b in raw):
            bias[idx] = BANNED_BIAS
        elif raw.strip(b" ") == b"":
            bias[idx] = WHITESPACE_BIAS
        else:
            bias[idx] = TOKEN_BIASES.get(raw, 0.0)
    return bias


def build_model(tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A tiny random Qwen2 whose greedy output is printable and never ends early."""
    endoftext_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=endoftext_id,
        eos_token_id=im_end_id,
        pad_token_id=endoftext_id,
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config).eval()

    # Random init gives nearly flat logits (std 0.02): greedy decoding picks
    # arbitrary bytes, including EOS and invalid UTF-8.  Larger lm_head
    # weights give clear winners (logit std ~3).
    #
    # Qwen2's lm_head has no bias, so build one: hidden channel BIAS_CHANNEL
    # holds the constant BIAS_CHANNEL_VALUE for every token (set in the
    # embedding; no layer writes to it), so after the final RMSNorm it is a
    # positive number (~2.4) and lm_head's column for it acts as a bias.
    with torch.no_grad():
        model.model.embed_tokens.weight[:, BIAS_CHANNEL] = BIAS_CHANNEL_VALUE
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[BIAS_CHANNEL, :] = 0.0
            layer.mlp.down_proj.weight[BIAS_CHANNEL, :] = 0.0
        weight = torch.randn(model.lm_head.weight.shape) * 0.5
        bias = token_biases(tokenizer)
        weight[bias == BANNED_BIAS] = 0.0  # banned tokens: nothing but the bias
        weight[:, BIAS_CHANNEL] = bias
        model.lm_head.weight.copy_(weight)

    model.generation_config = GenerationConfig(
        bos_token_id=endoftext_id,
        eos_token_id=im_end_id,
        pad_token_id=endoftext_id,
        do_sample=False,
    )
    return model


def check_greedy_output(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast) -> str:
    """Fail the build if greedy output stops early or is not printable ASCII."""
    messages = [
        {"role": "system", "content": "You write titles."},
        {"role": "user", "content": "hello world"},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    max_new_tokens = 64
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    new_ids = out[0, input_ids.shape[1]:]
    text = tokenizer.decode(new_ids)
    if len(new_ids) != max_new_tokens:
        raise RuntimeError(f"greedy output stopped after {len(new_ids)} tokens: {text!r}")
    if not all(0x20 <= ord(c) <= 0x7E for c in text):
        raise RuntimeError(f"greedy output is not printable ASCII: {text!r}")
    return text


def export_openvino(hf_dir: Path, ov_dir: Path) -> None:
    """Export with optimum-cli from this interpreter's venv, int4 symmetric per-channel.

    group-size -1 (per-channel) because with the default group size 128 NNCF
    fails on the 64-wide layers (InvalidGroupSizeError); ratio 1.0 so every
    linear layer is int4 (embedding and lm_head stay int8, NNCF's default).
    """
    optimum_cli = Path(sys.executable).parent / "optimum-cli"
    cmd = [
        str(optimum_cli), "export", "openvino",
        "--model", str(hf_dir),
        "--task", "text-generation-with-past",
        "--weight-format", "int4", "--sym", "--ratio", "1.0", "--group-size", "-1",
        str(ov_dir),
    ]
    # Never reach for the Hub: everything is local.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run(cmd, check=True, env=env)


def make_reproducible(ov_dir: Path) -> None:
    """Drop build-machine specifics from the exported files."""
    # optimum records the temporary HF directory it took the tokenizer from
    # as quantization_config.tokenizer; blank it so two builds are identical.
    config_path = ov_dir / "openvino_config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["tokenizer"] = ""
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_output(ov_dir: Path, out_dir: Path) -> None:
    """Replace out_dir's contents with the runtime files and the README."""
    if out_dir.exists():
        # Only ever wipe a directory that holds a previous build of this fixture.
        if any(out_dir.iterdir()) and not (out_dir / "openvino_model.xml").exists():
            raise SystemExit(f"refusing to overwrite {out_dir}: not empty and not a previous build")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name in KEEP_FILES:
        src = ov_dir / name
        if src.exists():
            shutil.copyfile(src, out_dir / name)
    (out_dir / "README.md").write_text(README)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="output directory, e.g. tests/fixtures/tiny-chatml-ov")
    args = parser.parse_args(argv)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    sample = check_greedy_output(model, tokenizer)
    print(f"vocab size {len(tokenizer)}; greedy sample: {sample!r}")

    with tempfile.TemporaryDirectory(prefix="tiny-chatml-") as tmp:
        hf_dir = Path(tmp) / "hf"
        ov_dir = Path(tmp) / "ov"
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        export_openvino(hf_dir, ov_dir)
        make_reproducible(ov_dir)
        copy_output(ov_dir, args.out_dir)

    total = sum(f.stat().st_size for f in args.out_dir.iterdir())
    print(f"wrote {args.out_dir} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
