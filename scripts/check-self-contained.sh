#!/usr/bin/env bash
# The repository must stand alone: no tracked file may cite a document that lives outside it
# (a team notes directory, or its numbered "facts" sections). The facts the code relies on are
# in docs/freebsd-kpi.md, each with the FreeBSD (Linux, QEMU) source file and function.
# Fails, listing every offending line, when one is found. The patterns are split with a
# bracket expression so that this script does not match itself.
set -euo pipefail
cd "$(dirname "$0")/.."

patterns='shared/doc[s]|facts[ ]§|facts [0-9]+\.[0-9]|qemu-la[b]\.md|cross-buil[d]\.md'
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    files() { git ls-files -z; }
else
    files() { find . -path ./target -prune -o -path ./.cache -prune -o -path ./.git -prune -o -type f -print0; }
fi
if hits=$(files | xargs -0 grep -nIE "$patterns" --); then
    echo "citations of documents outside the repository (use docs/freebsd-kpi.md and the source file):"
    echo "$hits"
    exit 1
fi
echo "self-contained: no citation of an outside document"
