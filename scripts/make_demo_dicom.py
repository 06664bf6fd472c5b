#!/usr/bin/env python3
"""Write synthetic chest radiographs (and optionally a non-image instance) as DICOM files.

    python scripts/make_demo_dicom.py OUT_DIR --count 3 --seed 1 --with-non-image
    python scripts/make_demo_dicom.py OUT_DIR --family mammo            # RCC, LCC, RMLO, LMLO of one study
    python scripts/make_demo_dicom.py OUT_DIR --family ct --slices 32 --missing 10 --haemorrhage
    python scripts/make_demo_dicom.py OUT_DIR --family mr | spine [--region CSPINE] [--compress j2k]

Each radiograph is its own study unless --same-study is given. The images are fake and
describe no person; see scripts/synthetic/dicom.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom import uid
from pydicom.uid import generate_uid

from scripts.synthetic.dicom import (
    compress,
    dataset_bytes,
    iter_ct_head_series,
    make_chest_xray,
    make_mammography_exam,
    make_mr_brain_series,
    make_non_image,
    make_spine_xray,
)

SYNTAXES = {"rle": uid.RLELossless, "jpeg-lossless": uid.JPEGLosslessSV1, "jpeg-ls": uid.JPEGLSLossless,
            "jpeg-ls-near": uid.JPEGLSNearLossless, "j2k": uid.JPEG2000Lossless, "j2k-lossy": uid.JPEG2000,
            "jpeg-baseline": uid.JPEGBaseline8Bit}


def _other_family(args: argparse.Namespace) -> int:
    """Mammography exam, CT or MR head series, or a spine radiograph: one study per run."""
    common = {"patient_id": args.patient_id, "study_uid": args.study_uid, "accession": args.accession}
    if args.family == "mammo":
        rows = args.size or 3328
        datasets = make_mammography_exam(args.seed, rows=rows, cols=round(rows * 2560 / 3328), **common)
        names = [f"mg_{d.ImageLaterality}{d.ViewPosition}.dcm" for d in datasets]
    elif args.family == "ct":
        datasets = list(iter_ct_head_series(args.seed, slices=args.slices, size=args.size or 512,
                                            thickness=args.thickness, missing=args.missing,
                                            haemorrhage=args.haemorrhage, **common))
        names = [f"ct_{d.InstanceNumber:04d}.dcm" for d in datasets]
    elif args.family == "mr":
        datasets = make_mr_brain_series(args.seed, slices=args.slices, size=args.size or 256,
                                        thickness=args.thickness, missing=args.missing, **common)
        names = [f"mr_{d.InstanceNumber:04d}.dcm" for d in datasets]
    else:
        rows = args.size
        datasets = [make_spine_xray(args.seed, args.region, rows=rows, cols=round(rows * 0.8) if rows else None,
                                    photometric="MONOCHROME1" if args.monochrome1 else "MONOCHROME2", **common)]
        names = [f"spine_{args.region.lower()}.dcm"]
    for ds, name in zip(datasets, names):
        if args.compress:
            ds = compress(ds, SYNTAXES[args.compress])
        path = args.out_dir / name
        path.write_bytes(dataset_bytes(ds))
        print(f"{path}\tstudy={ds.StudyInstanceUID}\tseries={ds.SeriesInstanceUID}\tsyntax={ds.file_meta.TransferSyntaxUID.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write .dcm files into (created)")
    parser.add_argument("--count", type=int, default=1, help="number of radiographs (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the first image; the next ones use seed+1...")
    parser.add_argument("--family", choices=("cxr", "mammo", "ct", "mr", "spine"), default="cxr",
                        help="chest radiographs (default), mammography exam, CT/MR head series, spine radiograph")
    parser.add_argument("--size", type=int, help="rows and columns (default 2048 chest, 3328 mammo rows, "
                                                 "512 CT, 256 MR, per region for spine)")
    parser.add_argument("--slices", type=int, default=32, help="CT/MR: slices in the series (default 32)")
    parser.add_argument("--thickness", type=float, default=5.0, help="CT/MR: slice thickness in mm (default 5)")
    parser.add_argument("--missing", type=int, nargs="*", default=[], help="CT/MR: slice indices to leave out")
    parser.add_argument("--haemorrhage", action="store_true", help="CT: add a ~70 HU blob")
    parser.add_argument("--region", choices=("CSPINE", "TSPINE", "LSPINE"), default="LSPINE", help="spine region")
    parser.add_argument("--compress", choices=sorted(SYNTAXES), help="write this compressed transfer syntax")
    parser.add_argument("--modality", choices=("DX", "CR"), default="DX")
    parser.add_argument("--view", default="PA", help="ViewPosition (default PA)")
    parser.add_argument("--monochrome1", action="store_true", help="store inverted (MONOCHROME1)")
    parser.add_argument("--patient-id", default="DEMO-0001")
    parser.add_argument("--accession", help="AccessionNumber (default: generated from the seed)")
    parser.add_argument("--study-uid", help="StudyInstanceUID (default: generated)")
    parser.add_argument("--same-study", action="store_true", help="put every image in one study")
    parser.add_argument("--with-non-image", choices=("sr", "pdf"), help="also write a non-image instance per study")
    args = parser.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.family != "cxr":
        return _other_family(args)
    args.size = args.size or 2048
    shared_study = args.study_uid or (generate_uid() if args.same_study else None)
    for index in range(args.count):
        seed = args.seed + index
        accession = args.accession or f"ACC{seed:08d}"
        ds = make_chest_xray(
            seed,
            study_uid=shared_study,
            accession=accession,
            patient_id=args.patient_id,
            size=args.size,
            modality=args.modality,
            view_position=args.view,
            photometric="MONOCHROME1" if args.monochrome1 else "MONOCHROME2",
        )
        if args.compress:
            ds = compress(ds, SYNTAXES[args.compress])
        path = args.out_dir / f"cxr_{seed:04d}.dcm"
        path.write_bytes(dataset_bytes(ds))
        print(f"{path}\tstudy={ds.StudyInstanceUID}\taccession={accession}")
        if args.with_non_image and (shared_study is None or index == 0):
            extra = make_non_image(
                ds.StudyInstanceUID, args.with_non_image, accession=accession, patient_id=args.patient_id
            )
            extra_path = args.out_dir / f"cxr_{seed:04d}_{args.with_non_image}.dcm"
            extra_path.write_bytes(dataset_bytes(extra))
            print(f"{extra_path}\tstudy={ds.StudyInstanceUID}\tnon-image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
