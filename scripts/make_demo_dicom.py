#!/usr/bin/env python3
"""Write synthetic chest radiographs (and optionally a non-image instance) as DICOM files.

    python scripts/make_demo_dicom.py OUT_DIR --count 3 --seed 1 --with-non-image

Each radiograph is its own study unless --same-study is given. The images are fake and
describe no person; see interop/dicom/synthetic.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom.uid import generate_uid  # noqa: E402

from interop.dicom.synthetic import dataset_bytes, make_chest_xray, make_non_image  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write .dcm files into (created)")
    parser.add_argument("--count", type=int, default=1, help="number of radiographs (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the first image; the next ones use seed+1...")
    parser.add_argument("--size", type=int, default=2048, help="rows and columns (default 2048)")
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
