"""The systemd units the Debian packages bring, for nodes installed from an artifact bundle (render/artifacts.py).

An apt install gets them from the packages; a bundle holds bare binaries, so the program writes the same units.
"""

from __future__ import annotations

UNIT_DIR = "/usr/lib/systemd/system"  # the debs' %{_unitdir}; /lib is a link to /usr/lib on Ubuntu 24.04

# kubernetes/release cmd/krel/templates/latest at f618b2a: the kubelet deb's unit (install -m 644) and environment
# file (/etc/default/kubelet, -m 644), the kubeadm deb's drop-in (-m 644, /etc/sysconfig/kubelet made
# /etc/default/kubelet for the deb by the spec's sed). Upstream's long lines are joined by Python's line continuation
# (a single backslash): a comment ends at its line's end in systemd, so a backslash left in the file would make the
# comment's next line a setting without "=" ("Missing '=', ignoring line.").
KUBELET_SERVICE = """\
[Unit]
Description=kubelet: The Kubernetes Node Agent
Documentation=https://kubernetes.io/docs/
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
StartLimitInterval=0
RestartSec=10

[Install]
WantedBy=multi-user.target
"""
KUBEADM_DROP_IN = """\
# Note: This dropin only works with kubeadm and kubelet v1.11+
[Service]
Environment="KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf \
--kubeconfig=/etc/kubernetes/kubelet.conf"
Environment="KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml"
# This is a file that "kubeadm init" and "kubeadm join" generates at runtime, populating the KUBELET_KUBEADM_ARGS \
variable dynamically
EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
# This is a file that the user can use for overrides of the kubelet args as a last resort. Preferably, the user \
should use
# the .NodeRegistration.KubeletExtraArgs object in the configuration files instead. KUBELET_EXTRA_ARGS should be \
sourced from this file.
EnvironmentFile=-/etc/default/kubelet
ExecStart=
ExecStart=/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
"""
# containerd v2.2.9's containerd.service (module root, as the Go module proxy serves it), with ExecStart at
# /usr/bin/containerd where Debian's package puts the binary (model/bundle.py BINARIES) instead of /usr/local/bin.
CONTAINERD_SERVICE = """\
[Unit]
Description=containerd container runtime
Documentation=https://containerd.io
After=network.target dbus.service

[Service]
ExecStartPre=-/sbin/modprobe overlay
ExecStart=/usr/bin/containerd

Type=notify
Delegate=yes
KillMode=process
Restart=always
RestartSec=5

LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity
OOMScoreAdjust=-999

[Install]
WantedBy=multi-user.target
"""
