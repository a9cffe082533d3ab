"""Unit caches find each tensor's sample axis, so a unit after an LSTM learns from whole samples."""
import io

import fuzzgraphs
import numpy as np
import onnx
import pytest
import torch

from packptq_onnx import convert, memory, onnx_import, progress, unitcache


def _gm(tmp_path, case):
    m, name, shape = fuzzgraphs.build(*case)
    path = str(tmp_path / "m.onnx")
    onnx.save(m, path)
    return convert.to_torch(onnx_import.load(path)), shape


def test_layouts_find_samples_off_axis_0_and_round_trip(tmp_path):
    gm, shape = _gm(tmp_path, ("seq", "lstm", 3, 1, "state"))
    lstm = next(n for n in gm.graph.nodes
                if n.op == "call_module" and type(getattr(gm, n.target)).__name__ == "Recurrent")
    y = next(u for u in lstm.users if u.args[1] == 0)           # Y [T, D, N, H]
    h = next(u for u in lstm.users if u.args[1] == 1)           # Y_h [D, N, H]
    x = torch.randn(5, *shape)
    inp = next(n for n in gm.graph.nodes if n.op == "placeholder")
    lays = unitcache.layouts(gm, (x,), [y, h, inp])
    assert [(l.axis, l.k) for l in lays] == [(2, 1), (1, 1), (0, 1)]
    batches = [(x[:3],), (x[3:],)]
    arrays = unitcache.capture(gm, batches, [y], lays[:1])
    full = unitcache.capture(gm, [(x,)], [y], None)[0][0]
    cache = unitcache.Cache(arrays, lays[:1], None, None)
    assert cache.n_items == 5
    got = cache.batch(np.array([1, 4]), "cpu")[0]
    np.testing.assert_allclose(got.numpy(), full[:, :, [1, 4]], rtol=1e-5, atol=1e-6)


def test_layouts_merged_axis_and_fixed_batch():
    gm = torch.fx.symbolic_trace(_Merge())
    nodes = {n.name: n for n in gm.graph.nodes}
    lays = unitcache.layouts(gm, (torch.randn(4, 3, 2),), [nodes["reshape"]])
    assert [(l.axis, l.k) for l in lays] == [(0, 3)]               # [N*3, 2]: 3 rows per sample
    assert unitcache.layouts(gm, (torch.randn(1, 3, 2),), [nodes["reshape"]]) is None  # batch of 1: unknown


class _Merge(torch.nn.Module):
    def forward(self, x):
        return x.reshape(-1, 2) * 2


def test_log_lines_report_count_loss_and_time_left():
    out = io.StringIO()
    it = progress.LogLines(range(5), "pack0", 5, every=0.0, stream=out)
    for _ in it:
        it.set_postfix(loss="0.5")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("  pack0: 1/5  loss 0.5  ~") and lines[0].endswith("left") and len(lines) == 4


def test_channels_last_cache_gives_the_same_values():
    """4-D tensors with samples first come out channels_last, value for value, from memory and disk;
    row_major() turns them back; other tensors are untouched."""
    rng = np.random.default_rng(0)
    four = rng.standard_normal((10, 1, 3, 5, 7)).astype(np.float32)  # [N, k, C, H, W] as capture keeps it
    two = rng.standard_normal((10, 1, 6)).astype(np.float32)
    lays = [unitcache.Layout(0), unitcache.Layout(0)]
    idx = np.array([2, 5, 9])
    ref = unitcache.Cache([four.copy(), two.copy()], lays, None, None).batch(idx, "cpu")
    for bound in (None, 1):
        cache = unitcache.Cache([four.copy(), two.copy()], lays, bound, None, channels_last=True)
        got = cache.batch(idx, "cpu")
        assert got[0].is_contiguous(memory_format=torch.channels_last) and not got[0].is_contiguous()
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and got[1].is_contiguous()
        cache.row_major()
        again = cache.batch(idx, "cpu")
        assert again[0].is_contiguous() and torch.equal(again[0], ref[0])
        cache.close()


@pytest.mark.skipif(not memory._glibc(), reason="glibc only")
def test_learning_heap_reuses_freed_blocks_without_page_faults():
    """A 64 MiB block malloc-ed, written and freed ten times: glibc maps it fresh each time (above its
    32 MiB mmap ceiling), so every page faults again; inside learning_heap the freed block serves the
    next one. glibc's own malloc: through torch the count varied from run to run (torch.ones or empty
    + fill_ after mapped allocations faulted on 7-8 of 10 inside, 0-1 without them, torch 2.13,
    glibc 2.36); the reconstruction's own gain is measured in bench/RECON_SPEED.md."""
    import ctypes
    import resource

    libc = memory._glibc()
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    n = 64 << 20

    def faults():
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            p = libc.malloc(n)
            ctypes.memset(p, 1, n)  # every page written
            libc.free(p)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

    outside = faults()
    with memory.learning_heap():
        inside = faults()
    after = faults()
    assert outside > 10 * 16384 * 0.9  # 4 KiB pages: every allocation faulted in again
    assert inside < outside / 4
    assert after > 10 * 16384 * 0.9  # glibc's behaviour back
