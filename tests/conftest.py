"""Tests run tiny models: one intra-op thread avoids oversubscription (5x faster on a busy 2-core box)."""

import os
import random
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)

_CHILD_ENV = "THRIFTY_TEST_IN_CHILD"


def pytest_configure(config):
    config.addinivalue_line("markers", "own_process: run the test in a child pytest process (Ray tests)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run an ``own_process`` test in a child pytest.

    A Ray driver whose local raylet goes away ends its whole process with status 1 and no
    traceback; in the test process that silently kills the rest of the suite. In a child it
    is one failing test with Ray's output attached. A child that ends with no pytest summary
    at all (that crash) is run once more; a child whose test fails is reported at once.
    """
    if pyfuncitem.get_closest_marker("own_process") is None or os.environ.get(_CHILD_ENV) == pyfuncitem.nodeid:
        return None
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid]
    env = {**os.environ, _CHILD_ENV: pyfuncitem.nodeid}
    outputs = []
    for _ in range(2):
        proc = subprocess.run(cmd, env=env, cwd=pyfuncitem.config.rootpath, capture_output=True, text=True,
                              timeout=900)
        outputs.append(proc.stdout[-4000:] + proc.stderr[-4000:])
        if proc.returncode == 0:
            return True
        crashed = not any(w in proc.stdout for w in (" passed", " failed", " error"))
        if not crashed:
            break
    pytest.fail(f"{pyfuncitem.nodeid} failed in its own process (exit {proc.returncode}):\n"
                + "\n--- next attempt ---\n".join(outputs), pytrace=False)


@pytest.fixture(scope="session")
def tiny_planner_dir(tmp_path_factory):
    """A planner directory like the shipped one, but tiny and untrained: a BPE tokenizer trained on a few expert
    transcripts and a random 3-layer Llama. Its outputs are mostly not actions, which exercises the parser."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from thrifty.agents.transcript import Transcript
    from thrifty.train.planner import collect_episode, train_tokenizer

    rng = random.Random(0)
    episodes = [collect_episode(level, seed, 0.1, rng) for level in ("GoToLocal", "PickupLoc") for seed in range(15)]
    texts = [Transcript(e["mission"], e["observations"], e["taken"]).text() for e in episodes]
    tok = train_tokenizer(texts, 320)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_planner")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pruner_path(tiny_planner_dir, tmp_path_factory):
    """An untrained pruner checkpoint of the right shape for `tiny_planner_dir` (plumbing tests: which tokens it
    keeps does not matter there, only that token_pruning configurations can run on the tiny planner)."""
    from thrifty.backbones import HFDecoder
    from thrifty.techniques.pruning_common import default_prune_layers
    from thrifty.techniques.token_pruning import TokenScorer, model_fingerprint

    backbone = HFDecoder.load(tiny_planner_dir)
    torch.manual_seed(0)
    scorer = TokenScorer(backbone.shape.d_model, default_prune_layers(backbone.n_layers),
                         {"n_layers": backbone.n_layers, "model": str(tiny_planner_dir),
                          "model_fingerprint": model_fingerprint(backbone)})
    return scorer.save(tmp_path_factory.mktemp("tiny_pruner") / "model.safetensors")


@pytest.fixture(scope="session")
def tiny_exit_head_dir(tiny_planner_dir, tmp_path_factory):
    """An untrained exit head for `tiny_planner_dir` (the logit lens, random held-out scores): plumbing tests of
    early_exit configurations on the tiny planner; tests/test_early_exit_planner.py trains a real one."""
    from thrifty.agents.planner_exits import (ExitHeadConfig, PlannerExitHead, action_token_ids, model_fingerprint,
                                              save_exit_head)
    from transformers import AutoTokenizer

    from thrifty.backbones import HFDecoder
    from thrifty.envs.babyai_text import ACTIONS

    backbone = HFDecoder.load(tiny_planner_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_planner_dir)
    cfg = ExitHeadConfig(d_model=backbone.shape.d_model, n_layers=backbone.n_layers, actions=tuple(ACTIONS),
                         action_token_ids=action_token_ids(tokenizer, ACTIONS), hidden=16)
    torch.manual_seed(0)
    head = PlannerExitHead(cfg)
    head.init_from(backbone)
    return save_exit_head(tmp_path_factory.mktemp("tiny_exit_head"), head, torch.rand(backbone.n_layers - 1, 32),
                          {"model": model_fingerprint(backbone)})
