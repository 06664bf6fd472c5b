#!/bin/sh
# Rebuild the worklist's DICOM viewer bundle from npm (Cornerstone3D, MIT) with esbuild:
#   interop/web/static/vendor/cornerstone.min.js  (+ .LEGAL.txt: the bundled packages' licence notices)
# The bundle is carried in the repository so the hub serves it with no network at all (hospital
# networks are closed; no CDN). Run this after changing scripts/viewer/package.json.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out="$root/interop/web/static/vendor"
cd "$here/viewer"
npm install --no-audit --no-fund --loglevel=error
mkdir -p "$out"
./node_modules/.bin/esbuild entry.js --bundle --minify --format=iife --legal-comments=external \
  --log-level=warning --metafile=meta.json --outfile="$out/cornerstone.min.js"
# Every npm package that ended up in the bundle, with its licence text (Cornerstone3D is MIT,
# vtk.js BSD-3-Clause, ...): vendor/LICENSES.txt
node -e '
const fs = require("fs"), path = require("path");
const inputs = Object.keys(JSON.parse(fs.readFileSync("meta.json")).inputs);
const names = [...new Set(inputs.map(i => (i.match(/node_modules\/((@[^/]+\/)?[^/]+)/) || [])[1]).filter(Boolean))].sort();
let text = "Licences of the npm packages bundled into cornerstone.min.js (scripts/build_viewer.sh)\n";
for (const name of names) {
  const dir = path.join("node_modules", name), pkg = JSON.parse(fs.readFileSync(path.join(dir, "package.json")));
  const file = fs.readdirSync(dir).find(f => /^(licen[cs]e|copying)/i.test(f));
  text += `\n==== ${name}@${pkg.version} (${pkg.license || "see below"}) ====\n`;
  text += file ? fs.readFileSync(path.join(dir, file), "utf8") : "(no licence file in the package)\n";
}
fs.writeFileSync(process.argv[1], text);
' "$out/LICENSES.txt"
rm -f meta.json
versions=$(node -e 'const p=require("./package.json").dependencies;console.log(Object.entries(p).map(([k,v])=>k+"@"+v).join(" "))')
printf 'Built %s by scripts/build_viewer.sh from %s\n' "$(date -u +%Y-%m-%d)" "$versions" > "$out/BUILD.txt"
echo "viewer bundle: $(wc -c < "$out/cornerstone.min.js") bytes in $out"
