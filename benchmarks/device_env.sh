# Source on the device machine from the repository root: makes `import polarc` (with the
# package-dir mapping polarc.plugins -> plugins/, ...) work without installing anything.
_root=$PWD
rm -rf /tmp/polarc_pkg && mkdir -p /tmp/polarc_pkg/polarc
for f in "$_root"/polarc/*; do ln -s "$f" /tmp/polarc_pkg/polarc/; done
ln -s "$_root/plugins" /tmp/polarc_pkg/polarc/plugins
ln -s "$_root/calibration" /tmp/polarc_pkg/polarc/calibration
ln -s "$_root/exporters" /tmp/polarc_pkg/polarc/exporters
ln -s "$_root/tests" /tmp/polarc_pkg/tests  # tests import their shared helpers as tests.*
export PYTHONPATH=/tmp/polarc_pkg${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
