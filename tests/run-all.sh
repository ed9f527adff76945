#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian machine and runs it:
# Debian packages for the real daemons the rendered configs are checked against,
# a virtualenv with the pinned Python dependencies, then ruff, mypy and pytest.
# Run as root (network namespaces and the daemons need it): sudo bash tests/run-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  haproxy keepalived            # API load balancer: haproxy -c, keepalived --config-test, live VIP failover
  cloud-init                    # cloud-init schema for every rendered user-data
  shellcheck                    # every rendered remote script
  etcd-server etcd-client       # external etcd: a real cluster from the program's certificates
  openssl curl iproute2 procps psmisc  # PKI checks; namespaces, bridges and veths; process control
  graphviz                      # the offline plan's dependency graph
  openssh-client                # ssh-keygen reads the known_hosts files pinning hypervisor host keys
  openssh-server sudo           # the tools' SshTransport against a real sshd and sudo, inside namespaces
  gpg gpgv                      # pinned signing keys (pkgs.k8s.io) and signed image checksums, checked for real
  runc                          # real containerd + ctr run the etcd tools the way the nodes do
  libvirt-daemon-system libvirt-clients  # a libvirtd the real `pulumi preview` of dev connects to (tests/real/engine)
)
VENV="${KUBEADM_HA_TEST_VENV:-.venv}"

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for package in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    # Keep package scripts from starting haproxy, keepalived, etcd or libvirtd on this machine:
    # the tests start their own copies (inside network namespaces, or on a socket of their own).
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && created_policy=1
    fi
    trap '[ "$created_policy" -eq 1 ] && rm -f "$policy"' EXIT
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "not root or no apt-get: skipping Debian packages; integration tests will skip (or fail under CI=true)"
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

# The real binaries tests/real runs (kubeadm, kube-apiserver, etcd, containerd, the Pulumi CLI, language host and
# provider plugins), built by tests/real/build-binaries from the Go module proxy (the Pulumi modules it refuses
# from ../shared/third_party) and cached in ~/.cache/kubeadm-ha/bin: a cold build takes many minutes, a warm one
# nothing. Without Go the tests that need them skip, or fail under CI=true.
if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
  export PATH="$PATH:/usr/local/go/bin"
fi
if command -v go >/dev/null; then
  timeout "${KUBEADM_HA_BUILD_TIMEOUT:-4200}" "$VENV/bin/python" -m tests.real.binaries
else
  echo "no Go toolchain on PATH: skipping tests/real/build-binaries; tests/real will skip (or fail under CI=true)"
fi

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest "$@"
