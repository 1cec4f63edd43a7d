"""`make test-gpu` prints what it runs on first, and fails (not skips) without a CUDA GPU."""

import sys

import torch


def main() -> int:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}")
    if not torch.cuda.is_available():
        print("make test-gpu needs a CUDA GPU, and torch sees none (a CPU build of torch, no driver, or "
              "CUDA_VISIBLE_DEVICES empty): use `make test` on a machine without one", file=sys.stderr)
        return 1
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        print(f"GPU {index}: {props.name}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
