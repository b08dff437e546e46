"""Shard loader: mixing, exactly-once epochs, resume, DP x worker layout invariance, skips, errors, config, preview."""
import json
import signal
import time
from collections import Counter

import pytest
import torch
import yaml

from megallava import config as C
from megallava.data import loader as L, preview
from megallava.data.batching import IGNORE_INDEX
from megallava.data.shards import write_shards
from megallava.data.templates import VICUNA_SYSTEM
from megallava.data.tokenizer import train_sentencepiece
from tests.test_shards import make_image, qa, write_json

WORDS = "red green blue square circle photo cat dog tree sky house car what is in the picture describe it".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two shard sources (multimodal: 16 samples, language-only: 24) and a sentencepiece tokenizer."""
    tmp = tmp_path_factory.mktemp("loader")
    (tmp / "img").mkdir()
    for i in range(4):
        make_image(tmp / "img" / f"{i}.jpg", size=(20 + 4 * i, 16), color=(40 * i, 100, 200 - 30 * i))
    mm = [{"id": f"mm{i}", "image": f"{i % 4}.jpg",
           "conversations": qa(f"<image>\nDescribe picture {i}.", " ".join(WORDS[i % 7:i % 7 + 3 + i % 5]))}
          for i in range(16)]
    text = [{"id": f"t{i}", "conversations": qa(f"Question {i}: {WORDS[i % 19]}?", f"Answer {i} " + WORDS[-i % 19])
             + ([] if i % 3 else qa(f"And {i}?", "More " * (1 + i % 4)))} for i in range(24)]
    write_shards([write_json(tmp / "mm.json", mm)], str(tmp / "mm"), "mm", str(tmp / "img"),
                 max_samples_per_shard=5, log=lambda _: None)
    write_shards([write_json(tmp / "text.json", text)], str(tmp / "text"), "text", max_samples_per_shard=7,
                 log=lambda _: None)
    corpus = [t["value"] for r in mm + text for t in r["conversations"]] + ["USER: ASSISTANT:", VICUNA_SYSTEM] * 5
    tok = train_sentencepiece(corpus * 4, str(tmp / "tok"), 320)
    return tmp, tok


def make_cfg(data, sources, **over):
    tmp, tok = data
    args = {"model.vision.image_size": 28, "data.source": "shards", "data.tokenizer": tok, "data.seq_length": 400,
            "data.num_workers": 0, "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.seed": 7}
    args.update(over)
    cfg = C.load_config(None, [f"{k}={v}" for k, v in args.items()])
    cfg.data.sources = [C.SourceConfig(path=str(tmp / name), weight=w) for name, w in sources]
    return cfg


def batches(cfg, dp_size, iterations, start=0, with_images=True):
    """{dp_rank: [micro-batches]} for global batches start .. start+iterations-1."""
    n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp_size)
    out = {}
    for rank in range(dp_size):
        it = L.build_microbatch_iterator(cfg, rank, dp_size, start, with_images)
        out[rank] = [next(it) for _ in range(iterations * n_micro)]
    return out


def global_samples(cfg, dp_size, iterations, start=0, with_images=True):
    """Per global batch: its samples (unpadded tokens, labels, source, key) and images, in global order."""
    per_rank = batches(cfg, dp_size, iterations, start, with_images)
    n_micro = len(per_rank[0]) // iterations
    steps = []
    for t in range(iterations):
        samples, images = [], []
        for rank in range(dp_size):
            for b in per_rank[rank][t * n_micro:(t + 1) * n_micro]:
                for i, n in enumerate(b["lengths"]):
                    samples.append((b["tokens"][i, :n].tolist(), b["labels"][i, :n].tolist(),
                                    int(b["source_ids"][i]), b["keys"][i]))
                if b.get("images") is not None:
                    images.append(b["images"])
        steps.append((samples, torch.cat(images) if images else None))
    return steps


def test_mixing_fractions(data):
    cfg = make_cfg(data, [("mm", 0.8), ("text", 0.2)])
    mix = L.MicroBatches(cfg, 0, 1, with_images=False).mix
    counts = Counter(mix.locate(j)[0] for j in range(2000))
    assert abs(counts[0] / 2000 - 0.8) < 0.03 and abs(counts[1] / 2000 - 0.2) < 0.03
    # the loader's batches follow the same draws (and carry them as source_ids)
    steps = global_samples(cfg, 1, 2, with_images=False)
    drawn = [s[2] for samples, _ in steps for s in samples]
    assert drawn == [mix.locate(j)[0] for j in range(16)]


def test_exactly_once_per_epoch_dp2_x_2_workers(data):
    cfg = make_cfg(data, [("text", 1.0)], **{"data.num_workers": 2})  # 24 samples = 3 global batches
    steps = global_samples(cfg, 2, 6, with_images=False)
    epochs = [[s[3] for samples, _ in steps[e * 3:(e + 1) * 3] for s in samples] for e in range(2)]
    keys = sorted(f"text_{i:09d}" for i in range(24))
    assert sorted(epochs[0]) == keys and sorted(epochs[1]) == keys
    assert epochs[0] != epochs[1] and epochs[0] != keys  # shuffled, differently per epoch


def test_resume_mid_epoch_equals_uninterrupted(data):
    cfg = make_cfg(data, [("mm", 0.6), ("text", 0.4)])
    full = global_samples(cfg, 2, 5)
    resumed = global_samples(cfg, 2, 2, start=3)
    for (a, ia), (b, ib) in zip(full[3:], resumed):
        assert a == b and torch.equal(ia, ib)


def test_layout_invariance_dp1x1_vs_dp2x2_workers(data):
    one = global_samples(make_cfg(data, [("mm", 0.5), ("text", 0.5)]), 1, 3)
    two = global_samples(make_cfg(data, [("mm", 0.5), ("text", 0.5)], **{"data.num_workers": 2}), 2, 3)
    assert len(one) == len(two) == 3
    for (a, ia), (b, ib) in zip(one, two):
        assert a == b and len(a) == 8
        assert torch.equal(ia, ib) and ia.shape[1:] == (3, 28, 28)
    # the last pipeline stage (no images) sees the same tokens and labels and the same image counts
    no_img = global_samples(make_cfg(data, [("mm", 0.5), ("text", 0.5)]), 1, 3, with_images=False)
    assert [s for s, _ in no_img] == [s for s, _ in one]


def test_samples_are_masked_like_the_template(data):
    cfg = make_cfg(data, [("mm", 1.0)])
    b = next(L.build_microbatch_iterator(cfg, 0, 1, 0, True))
    n = b["lengths"][0]
    tokens, labels = b["tokens"][0, :n], b["labels"][0, :n]
    assert (tokens == cfg.model.image_token_id).sum() == 4 and b["num_images"] == 2  # 28 px / 14 = 2x2 tokens
    trained = labels != IGNORE_INDEX
    assert trained.any() and torch.equal(labels[:-1][trained[:-1]], tokens[1:][trained[:-1]])
    assert b["source_ids"].tolist() == [0, 0] and b["skipped"] == {} and b["empty"] is False


def test_overlong_policy_and_corrupt_bytes_are_skipped_and_counted(data, tmp_path):
    tmp, _ = data
    cfg = make_cfg(data, [("mm", 1.0)])
    full = next(L.build_microbatch_iterator(cfg, 0, 1, 0, True))
    first_image = int((full["tokens"][0] == cfg.model.image_token_id).nonzero()[0])
    cut = min(full["lengths"]) - 1  # after the image run, inside the answers: truncation keeps both samples
    b = next(L.build_microbatch_iterator(make_cfg(data, [("mm", 1.0)], **{"data.seq_length": cut}), 0, 1, 0, True))
    assert b["tokens"].shape == (2, cut) and b["skipped"] == {} and b["lengths"] == [cut, cut]
    assert torch.equal(b["labels"], full["labels"][:, :cut]) and torch.equal(b["images"], full["images"])
    b = next(L.build_microbatch_iterator(make_cfg(data, [("mm", 1.0)], **{"data.seq_length": cut,
                                                                           "data.overlong": "drop"}), 0, 1, 0, True))
    assert b["skipped"] == {"too_long": 2} and b["empty"] is True
    assert b["labels"].eq(IGNORE_INDEX).all() and b["source_ids"].tolist() == [-1] and b["lengths"] == [0]
    fixed = make_cfg(data, [("mm", 1.0)], **{"data.seq_length": cut, "data.overlong": "drop", "parallel.pp": 2,
                                              "parallel.vpp": 2})  # interleaved schedule: the row count is fixed
    b = next(L.build_microbatch_iterator(fixed, 0, 1, 0, False))
    assert b["tokens"].shape == (2, 1) and b["source_ids"].tolist() == [-1, -1] and b["lengths"] == [0, 0]
    inside = make_cfg(data, [("mm", 1.0)], **{"data.seq_length": first_image + 2})  # the cut would split an image
    assert next(L.build_microbatch_iterator(inside, 0, 1, 0, True))["skipped"] == {"too_long": 2}

    # flip one byte inside an image of every sample of the first shard: the CRC catches it on every stage
    import shutil
    shutil.copytree(tmp / "mm", tmp_path / "mm")
    manifest = json.load(open(tmp_path / "mm" / "manifest.json"))
    shard = manifest["shards"][0]
    with open(tmp_path / "mm" / shard["name"], "r+b") as f:
        for off, size in zip(shard["offsets"], shard["sizes"]):
            f.seek(off + size - 600)
            byte = f.read(1)
            f.seek(off + size - 600)
            f.write(bytes([byte[0] ^ 0xFF]))
    cfg = make_cfg(data, [("mm", 1.0)], **{"train.global_batch_size": 16})
    cfg.data.sources[0].path = str(tmp_path / "mm")
    for with_images in (True, False):
        it = L.build_microbatch_iterator(cfg, 0, 1, 0, with_images)
        got = [next(it) for _ in range(8)]  # one epoch of the 16 samples
        skipped = sum((Counter(b["skipped"]) for b in got), Counter())
        assert skipped == {"corrupt_sample": shard["num_samples"]}
        assert sum(len(b["keys"]) for b in got if not b["empty"]) == 16 - shard["num_samples"]
        assert not set(shard["keys"]) & {k for b in got for k in b["keys"]}


def test_images_decoded_only_when_needed_and_decode_failures(data, monkeypatch):
    def broken(*a, **k):
        raise L.ImageError("cannot decode")
    monkeypatch.setattr(L, "load_image", broken)
    cfg = make_cfg(data, [("mm", 1.0)])
    b = L.MicroBatches(cfg, 0, 1, with_images=False)[0]  # the last pipeline stage: counts images, decodes none
    assert b["skipped"] == {} and b["num_images"] == 2 and "images" not in b
    assert L.MicroBatches(cfg, 0, 1, with_images=True)[0]["skipped"] == {"bad_image": 2}
    assert L.skip_counts(b).tolist()[L.SKIP_REASONS.index("bad_image")] == 0
    # under PP the last stage cannot mirror a decode-time skip, so the first stage stops with the sample's name
    cfg = make_cfg(data, [("mm", 1.0)], **{"parallel.pp": 2})
    with pytest.raises(L.DataError, match=r"sample mm_\d+ in .*mm-\d+\.tar .*\(cannot decode\)"):
        L.MicroBatches(cfg, 0, 1, with_images=True)[0]


@pytest.mark.parametrize("fmt", ["png", "ppm"])
def test_preprocessed_shards_give_the_same_pixels(data, tmp_path, fmt):
    tmp, _ = data
    write_shards([str(tmp / "mm.json")], str(tmp_path / "mm"), "mm", str(tmp / "img"), max_samples_per_shard=5,
                 log=lambda _: None, image_size=28, image_mode="pad", image_format=fmt)
    original = global_samples(make_cfg(data, [("mm", 1.0)]), 1, 2)
    cfg = make_cfg(data, [("mm", 1.0)])
    cfg.data.sources[0].path = str(tmp_path / "mm")
    pre = global_samples(cfg, 1, 2)
    for (a, ia), (b, ib) in zip(original, pre):
        assert a == b and torch.equal(ia, ib)
    cfg = make_cfg(data, [("mm", 1.0)], **{"model.vision.image_size": 56})
    cfg.data.sources[0].path = str(tmp_path / "mm")
    with pytest.raises(L.DataError, match="preprocessed for image_size=28"):
        L.build_microbatch_iterator(cfg, 0, 1, 0, True)


def test_worker_error_surfaces(data, monkeypatch):
    def boom(self, s, k):
        raise ValueError(f"broken sample {s}/{k}")
    monkeypatch.setattr(L.MicroBatches, "sample", boom)
    it = L.build_microbatch_iterator(make_cfg(data, [("text", 1.0)], **{"data.num_workers": 2}), 0, 1, 0, False)
    with pytest.raises(ValueError, match="broken sample"):
        next(it)


def test_hung_worker_times_out(data, monkeypatch):
    def hang(self, q):
        time.sleep(60)
    monkeypatch.setattr(L.MicroBatches, "__getitem__", hang)
    monkeypatch.setattr(L, "WORKER_TIMEOUT_S", 1)
    it = L.build_microbatch_iterator(make_cfg(data, [("text", 1.0)], **{"data.num_workers": 1}), 0, 1, 0, False)
    start = time.time()
    with pytest.raises(RuntimeError, match="timed out"):
        next(it)
    assert time.time() - start < 3


def test_workers_survive_sigterm(data):
    """Preemption: SIGTERM reaches every process of the job; the workers must keep feeding the trainer through the
    iteration at whose end it saves."""
    import psutil

    cfg = make_cfg(data, [("text", 1.0)], **{"data.num_workers": 2})
    before = {c.pid for c in psutil.Process().children()}  # earlier tests' workers may still be shutting down
    it = L.build_microbatch_iterator(cfg, 0, 1, 0, False)
    first, _ = next(it), next(it)  # one micro-batch from each worker: both have run their worker_init_fn
    workers = [c for c in psutil.Process().children() if c.pid not in before]
    assert len(workers) == 2
    for w in workers:
        w.send_signal(signal.SIGTERM)
    gone, alive = psutil.wait_procs(workers, timeout=2)
    assert not gone
    later = [next(it) for _ in range(6)]
    assert first["tokens"].shape[0] and all(b["tokens"].shape[0] for b in later)


def test_workers_die_with_their_rank(data):
    """Workers ignore SIGTERM (above), so they must not outlive a rank that is SIGKILLed or ends on an error: the
    kernel kills them with their parent (PR_SET_PDEATHSIG), and kill_workers() ends them without waiting. Each case
    runs in a forked "rank" that leaves this process's loaders alone (gc.freeze)."""
    import gc
    import multiprocessing as mp
    import os
    import psutil

    cfg = make_cfg(data, [("text", 1.0)], **{"data.num_workers": 2})

    def alive(pid):  # orphaned workers are reaped by init: a zombie is dead
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def rank(writer, kill_own):
        try:
            gc.freeze()
            it = L.build_microbatch_iterator(cfg, 0, 1, 0, False)
            next(it)
            pids = L.worker_pids()
            if kill_own:
                L.kill_workers()  # the error path: SIGKILL, no join, no SIGCHLD report
            writer.send(pids)
            time.sleep(60)  # until SIGKILLed
        finally:
            os._exit(1)  # never Python's exit path (it would join the workers)

    for kill_own in (False, True):
        reader, writer = mp.get_context("fork").Pipe(duplex=False)
        child = mp.get_context("fork").Process(target=rank, args=(writer, kill_own))
        child.start()
        assert reader.poll(30), "the forked rank sent no worker pids"
        pids = reader.recv()
        assert len(pids) == 2
        if not kill_own:
            os.kill(child.pid, signal.SIGKILL)
        deadline = time.time() + 2
        while any(alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids), kill_own
        child.kill()
        child.join()


def test_config_yaml_and_validation(data, tmp_path):
    tmp, tok = data
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"vision": {"image_size": 28}}, "data": {
        "source": "shards", "tokenizer": tok,
        "sources": [{"path": str(tmp / "mm"), "weight": 0.8, "template": "vicuna_v1"},
                    {"path": str(tmp / "text"), "weight": 0.2}]}}))
    cfg = C.load_config(str(path))
    C.validate(cfg, 1)
    assert [s.weight for s in cfg.data.sources] == [0.8, 0.2] and cfg.data.sources[1].template == "vicuna_v1"
    assert L.source_names(cfg) == ["mm", "text"]
    C.dump_yaml(cfg, str(tmp_path / "resolved.yaml"))  # the resolved config loads back
    assert C.load_config(str(tmp_path / "resolved.yaml")).data == cfg.data

    with pytest.raises(C.ConfigError) as e:
        C.load_config(str(path), ["data.sources=[{path: x, wieght: 2}]"])
    assert "unknown key 'data.sources[0].wieght' (did you mean 'data.sources[0].weight'?)" in str(e.value)
    bad = C.load_config(str(path), [f"data.sources=[{{path: {tmp_path}/missing, weight: 0}}, "
                                     f"{{path: {tmp}/mm, template: chatml}}]", "data.image_mode=crop",
                                     "data.tokenizer=null", "data.overlong=cut"])
    with pytest.raises(C.ConfigError) as e:
        C.validate(bad, 1)
    msg = str(e.value)
    for expected in (f"data.sources[0].path={tmp_path}/missing does not exist", "data.sources[0].weight=0.0 must be > 0",
                     "data.sources[1].template='chatml' is not supported", "data.image_mode='crop' is not supported",
                     "data.overlong='cut'", "needs data.tokenizer"):
        assert expected in msg
    with pytest.raises(C.ConfigError, match="needs data.sources"):
        C.validate(C.load_config(None, ["data.source=shards", f"data.tokenizer={tok}",
                                        "model.vision.image_size=28"]), 1)


def test_preview(data, tmp_path, capsys):
    tmp, tok = data
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"vision": {"image_size": 28}}, "data": {
        "source": "shards", "tokenizer": tok, "num_workers": 0,
        "sources": [{"path": str(tmp / "mm"), "weight": 0.5}, {"path": str(tmp / "text"), "weight": 0.5}]}}))
    args = ["--config", str(path), "--n", "3"]
    assert preview.main(args + ["--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and all(len(x["input_ids"]) == len(x["labels"]) for x in rows)
    assert {x["source"] for x in rows} <= {"mm", "text"} and all(x["num_images"] in (0, 1) for x in rows)
    assert preview.main(args + ["train.seed=3"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 3 and "[[" in out and "ASSISTANT:" in out


def test_a_worker_dying_mid_handover_is_named():
    """A worker killed while this rank receives a batch from it shows as a closed socket (ConnectionResetError: the
    tensors' file descriptors travel over one), not as torch's 'worker exited unexpectedly'. The loader names the
    worker and the signal (waiting for the exit the closed socket announces), and the trainer does not take it for a
    lost peer rank. Other errors pass through unchanged."""
    import multiprocessing
    import os
    from megallava.training.faults import lost_peer

    ctx = multiprocessing.get_context("fork")

    class Batches:  # a multi-process loader iterator's surface, with one real worker process
        def __init__(self, error):
            self._workers = [ctx.Process(target=time.sleep, args=(60,))]
            self._workers[0].start()
            self.error, self.stopped = error, False

        def __iter__(self):
            return self

        def __next__(self):
            os.kill(self._workers[0].pid, signal.SIGKILL)  # dies as its batch is handed over
            raise self.error

        def _shutdown_workers(self):
            self.stopped = True

    it = Batches(ConnectionResetError(104, "Connection reset by peer"))
    with pytest.raises(L.DataError) as e:
        next(L._stop_workers_on_error(it))
    assert str(e.value).startswith(f"DataLoader worker (pid {it._workers[0].pid}) was killed by signal SIGKILL while "
                                   f"handing a batch to this rank (ConnectionResetError)"), str(e.value)
    assert "data.num_workers" in str(e.value) and isinstance(e.value.__cause__, ConnectionResetError)
    assert it.stopped and not lost_peer(e.value)
    other = Batches(ValueError("bad sample"))
    with pytest.raises(ValueError, match="bad sample"):
        next(L._stop_workers_on_error(other))
    assert other.stopped
