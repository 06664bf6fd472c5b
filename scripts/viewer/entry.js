// The viewer bundle's entry: Cornerstone3D's core and tools, and its DICOM image loader (the build
// without web workers: decoding on the page, so no worker script or blob: URL is needed), wired
// together and exposed as window.hubCornerstone for interop/web/static/viewer.js.
import * as core from '@cornerstonejs/core';
import * as tools from '@cornerstonejs/tools';
import dicomParser from 'dicom-parser';
import loader from '@cornerstonejs/dicom-image-loader/dist/cornerstoneDICOMImageLoaderNoWebWorkers.bundle.min.js';

loader.external.cornerstone = core;
loader.external.dicomParser = dicomParser;
window.hubCornerstone = { core, tools, loader };
