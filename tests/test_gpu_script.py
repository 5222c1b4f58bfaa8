"""``benchmarks/gpu.py`` imports without CUDA and says so instead of failing (its GPU parts run where one is lent)."""

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs for minutes: run it directly")
def test_gpu_benchmark_exits_cleanly_without_cuda(capsys):
    from benchmarks import gpu

    assert gpu.main([]) == 0
    assert "no CUDA" in capsys.readouterr().out
    assert gpu.pick_device("cuda") is None and gpu.pick_device("cpu") == torch.device("cpu")
