#!/bin/sh
# The main job: the spec's CI/CD pipeline and multi-stage build (examples/*.sloth) run on the
# embedded store in the default data directory (no server), then the artifacts they stored.
# The data directory is $SLOTH_RUNNER_DATA_DIR, else ~/.local/share/sloth-runner (or
# /var/lib/sloth-runner as root); running the demo again adds new versions, which deduplicate.
set -eu
cd "$(dirname "$0")/.."
sloth_runner() {
    cargo run --release --quiet -p sloth-cli -- "$@"
}
sloth_runner run ci_pipeline --file examples/ci_pipeline.sloth
echo
sloth_runner run multi_stage --file examples/multi_stage.sloth
echo
sloth_runner agent artifacts list local --stack ci_pipeline
echo
sloth_runner agent artifacts list local --stack multi_stage
echo
sloth_runner agent artifacts show local app.bin --stack ci_pipeline
