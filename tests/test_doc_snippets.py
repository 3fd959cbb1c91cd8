"""Every ```python block of README.md and docs/*.md runs (issue 16, Docs).

The blocks of one document run in order in one namespace, like notebook cells, so a later block
may use what an earlier one defined. What a document leaves to the reader (an input tensor `x`,
a model `name`, the `documents` to pack) is given below in CONTEXT, next to the block that first
needs it; nothing else is added. Models named by a Hugging Face hub id load as tiny random
models of that architecture (tests run offline); every other from_pretrained (a folder the
snippet saved) is transformers' own. Each document runs in a fresh temporary directory.
"""

from __future__ import annotations

import os

import pytest
import torch

from doc_snippets import documents, snippets

# document -> [(text of the first block that needs it, code run just before that block)]
CONTEXT = {
    "docs/huggingface.md": [
        ("from_pretrained(name)", "name = 'Qwen/Qwen2.5-0.5B'"),
        ("for doc in documents", "documents = [list(range(3, 40)), list(range(5, 17)), list(range(7, 60))]"),
    ],
    "docs/modules.md": [
        ("y = attn(x)", "x = torch.randn(2, 48, 512); pad = torch.zeros(2, 48, dtype=torch.bool); pad[1, :5] = True\n"
                        "pos = torch.arange(48)[None]; cu = torch.tensor([0, 30, 48, 96], dtype=torch.int32); n = 48"),
        ("attn.new_cache()", "prompt = torch.randn(2, 16, 512); next_token = torch.randn(2, 1, 512)"),
        ("logits = lm(ids)", "ids = torch.randint(0, 256, (2, 24)); pad = torch.zeros(2, 24, dtype=torch.bool)\n"
                             "pad[1, :7] = True; prompt = ids  # one padding mask fits both\n"
                             "cu = torch.tensor([0, 20, 48], dtype=torch.int32)"),
    ],
    "docs/positional.md": [
        ("config.head_dim", "import transformers\nconfig = transformers.LlamaConfig(hidden_size=256, "
                            "num_attention_heads=2, rope_parameters={'rope_type': 'yarn', 'factor': 4.0, "
                            "'rope_theta': 10000.0, 'original_max_position_embeddings': 2048})"),
        ("torch.split(x, 1024", "x = torch.randn(1, 2, 3072, 128)"),
    ],
}

# tiny stand-ins for the hub models the documents name
HUB_MODELS = {
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=256),
}


def _offline_hub(monkeypatch):
    transformers = pytest.importorskip("transformers")

    def tiny_config(name):
        settings = dict(HUB_MODELS[name])
        return transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)

    config_loader = transformers.AutoConfig.from_pretrained.__func__
    model_loader = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def config_from_pretrained(cls, name, *args, **kwargs):
        if name in HUB_MODELS and not os.path.exists(name):
            return tiny_config(name)
        return config_loader(cls, name, *args, **kwargs)

    def model_from_pretrained(cls, name, *args, config=None, **kwargs):
        if name in HUB_MODELS and not os.path.exists(name):
            return cls.from_config(config or tiny_config(name), **kwargs)
        if config is not None:
            kwargs["config"] = config
        return model_loader(cls, name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(config_from_pretrained))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(model_from_pretrained))


@pytest.mark.parametrize("path", [p for p in documents() if snippets(p)])
def test_snippets_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if any("transformers" in s.code for s in snippets(path)):
        _offline_hub(monkeypatch)
    pending = list(CONTEXT.get(path, []))
    namespace = {"__name__": "__doc_snippet__", "torch": torch}
    for snippet in snippets(path):
        while pending and pending[0][0] in snippet.code:
            exec(pending.pop(0)[1], namespace)
        try:
            exec(compile(snippet.code, f"{path}:{snippet.line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the snippet at {path}:{snippet.line} fails: {type(error).__name__}: {error}") from error
    assert not pending, f"CONTEXT for {path} names blocks that are not there: {[p[0] for p in pending]}"
