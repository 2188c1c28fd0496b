"""`xrayforge info` and `xrayforge prepare`."""
from __future__ import annotations

import argparse

from .. import __version__
from . import _args


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .. import ops
    from ..ops import _backend

    print(f"xrayforge {__version__}, torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}" + (" (interpreter mode)" if _backend.triton_interpreter_active() else ""))
    except ImportError:
        print("triton: not installed")
    try:
        _backend.cuda_extension()
        print("CUDA extension xrayforge._C: built")
    except ImportError as exc:
        print(f"CUDA extension: {exc}")
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "CPU"
        default = ops.get_backend()
        print(f"{dev} ({name}): default backend {default!r}"
              + (" (XRAYFORGE_BACKEND)" if default != "auto" else ""))
        said = set()
        for op in _backend.GPU_VALIDATED:
            why = _backend.unavailable_reason(default, op, torch.device(dev)) if default != "auto" else None
            used = _backend.resolve_for_device(op, torch.device(dev), "auto") if default == "auto" else \
                (default if why is None else "unavailable: commands on this device refuse to start")
            print(f"  {op:24s} available {', '.join(ops.available_backends(op, dev))}; {default} -> {used}")
            if why is not None and why not in said:
                said.add(why)
                print(f"    ({default!r} here: {why})")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare

    res = prepare(args.src, args.out, resolution=args.resolution, labels=args.labels, workers=args.workers,
                  square=args.square, bits=args.bits, progress=not args.quiet, labelled_only=args.labelled_only)
    print(f"{res.path}: {res.included} images, {res.skipped} skipped "
          f"(reasons in {res.path / 'skipped.csv'})")
    m = res.label_match
    if m:
        unlisted = f" ({'left out' if m['unlisted_left_out'] else 'all-zero labels'})" if m["unlisted"] else ""
        print(f"labels from {m['file']}: {m['matched']} image files matched a row; {m['unlisted']} not in it"
              f"{unlisted}; {m['rows_without_image']} rows without an image file"
              + (f"; {m['unlisted_patients_from_names']} unlisted took their patient from their file name"
                 if m.get("unlisted_patients_from_names") else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show versions, the CUDA extension and the backend each op uses",
                       description="Show versions, whether the CUDA extension is built, and which backend "
                                   "each fused op would use on each device.")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "prepare", help="turn radiographs (DICOM, PNG, JPEG, TIFF) or the phantom into a packed archive",
        description="Read every radiograph under SRC (recursively; DICOM with any suffix or none, PNG, JPEG, TIFF) or "
                    "generate phantom:N chest phantoms, make them square, resize, and write the packed "
                    "multi-resolution archive OUT (images_<R>.npy for R = 4 .. resolution, manifest.csv, "
                    "skipped.csv, archive.json). Interrupted runs resume when run again.")
    p.add_argument("src", help="folder, file, or phantom:N")
    p.add_argument("out", help="archive folder to create")
    p.add_argument("--resolution", type=_args.power_of_two, default=1024, help="largest resolution, a power of two (default 1024)")
    p.add_argument("--labels", default=None, help="ChestX-ray14 Data_Entry_2017.csv or Data_Entry_2017_v2020.csv "
                                                   "(default: found in SRC or its parent); train_val_list.txt / "
                                                   "test_list.txt beside it give the test split")
    p.add_argument("--labelled-only", action="store_true",
                   help="leave out the images the label file does not list (default: kept, labelled as having no "
                        "finding)")
    p.add_argument("--square", choices=("crop", "pad"), default="crop",
                   help="centre-crop to a square (default) or pad with black to keep the whole field")
    p.add_argument("--bits", type=int, choices=(8, 16), default=8, help="stored bit depth (default 8)")
    p.add_argument("--workers", type=_args.positive_int, default=None, help="decode processes (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)
