"""``enforcer doctor --pod NAMESPACE/NAME``: what pod mode does for one pod, checked from the
enforcer container of the pod's node.

One ``ok`` / ``warn`` / ``FAIL`` line per check (``Report`` of ``enforcer doctor``): the pod as the
API server has it (not found, on another node, ``hostNetwork``, not running); its tags and the
services they select from the definitions in force (none: the selectors that exist for its
namespace); its network namespace, found by the daemon's ``/proc`` scan with both guards; the
live table ``inet <redirect.table>`` inside it against the one the enforcer installs for those
services, printed in nft syntax with packet counters (a selected pod without it is not
protected; a table on a pod no service selects is stale); and, from sockets made inside the
pod's namespace, the enforcer's listener on ``kubernetes.pods.listenPort`` and each service's
app ``port`` on the pod's loopback. :func:`check_pod` is everything after the API read, with
the scan injectable (tests).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import Callable, Iterable
from typing import TextIO

from enforcer.cli.check import load_all_definitions
from enforcer.cli.doctor import Report
from enforcer.config import definitions as definitions_mod
from enforcer.config import issues
from enforcer.config import settings as settings_mod
from enforcer.config.kubernetes import KubernetesError, PodInfo, read_pod
from enforcer.net import nftables, ruleset
from enforcer.net.netns import run_in_netns
from enforcer.net.pods import PodNetns, find_pod_netns, route_source
from enforcer.net.ruleset import ProbeTarget
from enforcer.run.attach import build_pod_redirect, gated_probes
from enforcer.run.pods import Scan, in_namespace, pod_tags, services_for

SourceOf = Callable[[str], "str | None"]
"""The node's source address towards a pod IP (``enforcer.net.pods.route_source``)."""

ENFORCER_PODS = "kubectl -n enforcer-system get pods -l app.kubernetes.io/name=enforcer -o wide"


def _selectors(svc: definitions_mod.Service) -> str:
    return " or ".join("[" + ", ".join(clause) + "]" for clause in svc.selectors) or "[]"


def _connects(port: int) -> str:
    """Run inside the pod's namespace: "" if 127.0.0.1:``port`` accepts a TCP connection, else why not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return ""


def _check_pod_object(report: Report, pod: PodInfo, node: str | None) -> bool:
    """The pod as the API server has it; False when the per-node checks cannot apply."""
    where = f"pod {pod} (uid {pod.uid})"
    if pod.host_network:
        report.warn(f"{where} uses hostNetwork: pod mode does not apply to it (it shares the node's network "
                    "namespace); host mode covers it", "check the node with `enforcer doctor` (without --pod)")
        return False
    if node and pod.node and pod.node != node:
        report.fail(f"{where} runs on node {pod.node}; this enforcer serves node {node}",
                    f"exec into the enforcer pod on node {pod.node} ({ENFORCER_PODS}) and run "
                    f"`enforcer doctor --pod {pod}` there")
        return False
    if pod.deleting:
        report.warn(f"{where} is going away (being deleted, or finished: phase {pod.phase or 'unknown'}); "
                    "the enforcer lets it go when it is gone")
        return False
    if pod.phase and pod.phase != "Running":
        report.warn(f"{where} is not running (phase {pod.phase}): nothing to check yet",
                    f"kubectl -n {pod.namespace} describe pod {pod.name}")
        return False
    report.ok(f"{where} on node {pod.node or '?'}: phase {pod.phase or '?'}, IPs {', '.join(pod.ips) or 'none yet'}")
    return True


def _check_selection(
    report: Report, pod: PodInfo, definitions: definitions_mod.Definitions
) -> tuple[definitions_mod.Service, ...]:
    """Its tags and the services they select (namespace rule included); none: the selectors that exist."""
    tags = sorted(pod_tags(pod))
    services = services_for(pod, definitions)
    if services:
        report.ok(f"tags {tags} select service(s) " + ", ".join(
            f"{s.name} (exposedPort {s.exposed_port} -> the enforcer, app port {s.port})" for s in services))
        return services
    mine = in_namespace(definitions, pod.namespace).catalog
    offered = "; ".join(f"{s.name}: {_selectors(s)}" for s in mine) or "none"
    others = [s for s in definitions.catalog if s not in mine and s in definitions.for_tags(pod_tags(pod))]
    elsewhere = "".join(f"; service {s.name} of namespace {s.namespace} matches its labels but serves only pods "
                        f"of namespace {s.namespace}" for s in others)
    report.warn(f"pod {pod} is not selected by any service: the enforcer leaves it alone (tags {tags}); "
                f"selectors for namespace {pod.namespace}: {offered}{elsewhere}",
                "to protect it, give the pod (its Deployment's template) labels that one of those selectors "
                "names, or add an EnforcerService in its namespace selecting its labels")
    return ()


def _find_netns(report: Report, pod: PodInfo, scan: Scan, *, selected: bool) -> PodNetns | None:
    """Its network namespace by the daemon's ``/proc`` scan (never the host's, and it holds one of the pod's IPs)."""
    result = scan({pod.uid: pod.ips})
    found = result.found.pop(pod.uid, None)
    for other in result.found.values():
        other.close()
    if found is not None:
        report.ok(f"network namespace net:[{found.inode}] (found through pid {found.pid}; holds one of "
                  f"{', '.join(pod.ips)})")
        return found
    why = result.refused.get(pod.uid, "not found")
    fix = ("run doctor in the enforcer container on the pod's node: the scan needs hostPID and CAP_SYS_PTRACE "
           "(the pod-mode component sets both)")
    if not pod.ips:
        fix = "wait for the pod's IP (kubectl get pod -o wide), then run doctor again"
    (report.fail if selected else report.warn)(f"pod {pod}: its network namespace was not found: {why}", fix)
    return None


def _probe_targets(
    settings: settings_mod.Settings, pod: PodInfo, services: tuple[definitions_mod.Service, ...],
    probe_port: int | None, source_of: SourceOf,
) -> list[ProbeTarget]:
    """The probe-gate rules the enforcer adds for the pod's plain-HTTP probes of protected ports,
    from the node's address towards the pod, as the attachment computes them."""
    gated, _ = gated_probes(pod.probes, services, settings, probe_port)
    if not gated:
        return []
    sources = dict.fromkeys(s for s in map(source_of, pod.ips) if s)
    return [ProbeTarget(port, source) for port in gated for source in sources]


async def _check_table(
    report: Report, settings: settings_mod.Settings, pod: PodInfo, netns: PodNetns, *,
    definitions: definitions_mod.Definitions, services: tuple[definitions_mod.Service, ...], listen_port: int,
    source_of: SourceOf = route_source,
) -> bool:
    """The live table in the pod's namespace against the intended one; True if it is there."""
    table = settings.model.redirect.table
    try:
        live = await nftables.read_live(table, netns=netns.path)
    except (OSError, ruleset.RedirectError) as exc:
        report.fail(f"cannot read nftables in net:[{netns.inode}]: {exc}",
                    "run doctor in the enforcer container (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
        return False
    kube = settings.model.kubernetes
    probe_port = kube.pods.probePort if kube is not None else None
    targets = await asyncio.to_thread(_probe_targets, settings, pod, services, probe_port, source_of)
    expected = build_pod_redirect(services, settings, listen_port, targets, probe_port) if services else None
    if expected is None:
        if live.exists:
            report.warn(f"pod {pod}: a stale table inet {table} in its namespace ({len(live.rules)} rules) although "
                        "no service selects it: its exposed port may refuse and its app port reset clients",
                        f"the enforcer removes it when it releases the pod, and at its start from running pods "
                        f"nothing selects (restart the enforcer pod of this node); by hand on the node: nsenter -t "
                        f"<pid of a process of the pod> -n nft delete table inet {table}")
        else:
            report.ok(f"no table inet {table} in its namespace: untouched")
    elif not live.exists:
        report.fail(f"pod {pod} is selected but has no table inet {table} in its namespace: NOT protected, its app "
                    "port answers anyone", f"kubectl -n enforcer-system logs <the enforcer pod on node "
                    f"{pod.node or '?'}> | grep 'pod {pod}'; restarting that enforcer pod re-finds it")
        return False
    else:
        problems = nftables.diff(expected, live)
        if problems:
            report.fail(f"table inet {table} in pod {pod} differs from what its services need:\n        "
                        + "\n        ".join(problems),
                        "the enforcer replaces it at its next change; restart the enforcer pod of this node to "
                        "re-install it now")
        else:
            packets = sum(rule.packets or 0 for rule in live.rules)
            report.ok(f"table inet {table} in the pod's namespace matches its services ({len(live.rules)} rules, "
                      f"{packets} packets so far)")
    if live.exists:
        # a stale table is written in nft syntax as far as it is a table for services of the pod's namespace
        known = expected or build_pod_redirect(in_namespace(definitions, pod.namespace).catalog, settings, listen_port)
        print(f"live table in net:[{netns.inode}] (nft syntax; `nsenter -t <pid> -n nft list table inet {table}` "
              "shows the same):", file=report.out)
        print(live.render_nft(known), file=report.out)
    return live.exists


def _check_ports(
    report: Report, netns: PodNetns, services: Iterable[definitions_mod.Service], listen_port: int
) -> None:
    """From sockets made inside the pod's namespace: the enforcer's listener and each app port on its loopback."""
    _port_line(report, netns, listen_port,
               ok=f"the enforcer's listener accepts connections on 127.0.0.1:{listen_port} inside the pod",
               failed=f"the enforcer's listener in the pod (127.0.0.1:{listen_port})",
               fix="the enforcer does not serve this pod now: check its log for the pod; restart the enforcer pod")
    for port in sorted({s.port for s in services}):
        names = ", ".join(s.name for s in services if s.port == port)
        _port_line(report, netns, port, ok=f"the app answers on 127.0.0.1:{port} ({names}) inside the pod",
                   failed=f"the app port 127.0.0.1:{port} ({names}) inside the pod",
                   fix="the app must listen on the pod's loopback (0.0.0.0 or 127.0.0.1) at the service's port")


def _port_line(report: Report, netns: PodNetns, port: int, *, ok: str, failed: str, fix: str) -> None:
    """``ok`` if ``port`` accepts a connection from a socket made inside the pod's namespace, else
    ``failed: <why>`` with ``fix``."""
    problem = run_in_netns(netns.path, _connects, port)
    if problem:
        report.fail(f"{failed}: {problem}", fix)
    else:
        report.ok(ok)


async def check_pod(
    report: Report, settings: settings_mod.Settings, definitions: definitions_mod.Definitions, pod: PodInfo, *,
    node: str | None, scan: Scan = find_pod_netns, source_of: SourceOf = route_source,
) -> None:
    """Every per-pod check after the API read (``pod`` as read; ``node``: this enforcer's Node; ``scan``: the
    daemon's /proc scan; ``source_of``: the node's address towards a pod IP, for its probe rules); the namespace
    found is closed at the end."""
    if not _check_pod_object(report, pod, node):
        return
    services = _check_selection(report, pod, definitions)
    kube = settings.model.kubernetes
    listen_port = kube.pods.listenPort if kube is not None else settings.model.listen.port
    netns = await asyncio.to_thread(_find_netns, report, pod, scan, selected=bool(services))
    if netns is None:
        return
    try:
        present = await _check_table(report, settings, pod, netns, definitions=definitions, services=services,
                                     listen_port=listen_port, source_of=source_of)
        if present and services:
            await asyncio.to_thread(_check_ports, report, netns, services, listen_port)
    finally:
        netns.close()


def _pods_enabled(settings: settings_mod.Settings) -> None:
    kube = settings.model.kubernetes
    if kube is None or not kube.pods.enabled:
        raise issues.ConfigError([issues.ConfigIssue(
            str(settings.path), "kubernetes.pods.enabled",
            "`enforcer doctor --pod` checks pod mode, which this configuration does not enable",
            None if kube is None else False,
            "run it with the enforcer.yaml of a DaemonSet with the pod-mode component "
            "(kubernetes: {pods: {enabled: true}}), inside its container",
        )])


async def run(
    settings: settings_mod.Settings, definitions: definitions_mod.Definitions, namespace: str, name: str,
    out: TextIO,
) -> int:
    """Read the pod from the API server, then :func:`check_pod`; exit code 1 if any check failed."""
    report = Report(out)
    kube = settings.model.kubernetes
    assert kube is not None
    report.ok(f"configuration {settings.path}: {len(definitions.catalog)} service(s) in force")
    try:
        pod = await read_pod(namespace, name, kube.kubeconfig, kube.timeout)
    except KubernetesError as exc:
        report.fail(f"cannot read pod {namespace}/{name} from the API server: {exc}",
                    "check the enforcer's ServiceAccount (list pods) and kubernetes.kubeconfig")
        pod = None
    else:
        if pod is None:
            report.fail(f"pod {namespace}/{name} not found", f"kubectl get pods -n {namespace} (or -A)")
    if pod is not None:
        await check_pod(report, settings, definitions, pod, node=kube.nodeName)
    print(f"\n{report.failures} failure(s), {report.warnings} warning(s)", file=out)
    return 1 if report.failures else 0


def command(args: argparse.Namespace) -> int:
    """``enforcer doctor --pod NAMESPACE/NAME``."""
    settings = settings_mod.load_settings(args.config)
    _pods_enabled(settings)
    namespace, name = args.pod
    definitions = load_all_definitions(settings)
    return asyncio.run(run(settings, definitions, namespace, name, sys.stdout))
