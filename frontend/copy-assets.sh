#!/bin/sh
# Copy what the web pages load from the npm packages (installed by `npm ci`
# from package-lock.json) into kvmshell/web/static/vendor/, with their
# licences.  Run by `make web-assets`; nothing is loaded from a CDN.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
nm=$here/node_modules
out=${1:-$here/../kvmshell/web/static/vendor}
rm -rf "$out.new"
mkdir -p "$out.new/xterm" "$out.new/novnc"
cp "$nm/@xterm/xterm/lib/xterm.mjs" "$nm/@xterm/xterm/css/xterm.css" "$out.new/xterm/"
cp "$nm/@xterm/xterm/LICENSE" "$out.new/xterm/LICENSE.xterm"
cp "$nm/@xterm/addon-fit/lib/addon-fit.mjs" "$out.new/xterm/"
cp "$nm/@xterm/addon-fit/LICENSE" "$out.new/xterm/LICENSE.addon-fit"
cp -R "$nm/@novnc/novnc/core" "$nm/@novnc/novnc/vendor" "$out.new/novnc/"
cp "$nm/@novnc/novnc/LICENSE.txt" "$out.new/novnc/"
for p in @xterm/xterm @xterm/addon-fit @novnc/novnc; do
    node -e 'const p=require(process.argv[1]); console.log(p.name + " " + p.version)' \
        "$nm/$p/package.json"
done > "$out.new/VERSIONS"
rm -rf "$out"
mv "$out.new" "$out"
