#!/usr/bin/env bash
# Installs what the tests start on loopback, from the package registries; idempotent.
# - moto_server (PyPI `moto[server]`): the S3-compatible server of tests/share.rs;
# - pdflatex (Debian `texlive-latex-recommended`): tests/reports.rs compiles a LaTeX table.
set -euo pipefail
if command -v pdflatex >/dev/null 2>&1; then
  echo "== pdflatex: $(command -v pdflatex)"
elif command -v apt-get >/dev/null 2>&1; then
  echo "== installing texlive-latex-recommended from Debian"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq texlive-latex-recommended >/dev/null
fi
if command -v moto_server >/dev/null 2>&1; then
  echo "== moto_server: $(command -v moto_server)"
else
  echo "== installing moto[server] from PyPI"
  if ! command -v pip3 >/dev/null 2>&1 && ! command -v pip >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && apt-get install -y -qq python3-pip
    fi
  fi
  PIP=$(command -v pip3 || command -v pip)
  "$PIP" install --quiet 'moto[server]' || "$PIP" install --quiet --break-system-packages 'moto[server]'
  hash -r
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
  command -v moto_server >/dev/null 2>&1 || { echo "moto_server still not on PATH" >&2; exit 1; }
fi
