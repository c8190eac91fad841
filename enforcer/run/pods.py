"""Pod mode's controller: decide which pods of this Node are served, find their network
namespaces, and enrol or let go of each (:class:`PodController`).

A pod is a processing unit whose tags are (:func:`pod_tags`):

* one ``key=value`` tag per label (``app=frontend``);
* ``k8s:namespace=<namespace>`` and ``k8s:serviceaccount=<service account>``, so a service can
  select by namespace or identity. A label key cannot hold ``:`` (Kubernetes refuses it), so a
  pod cannot forge these with a label; any ``k8s:`` tag from a label is dropped all the same.

A pod is enrolled when it has its own network namespace (not ``hostNetwork``), is not going
away, and the definitions in force select at least one service for its tags (:func:`services_for`).
Namespace rule (security): a service defined by a custom resource in namespace A is served only
to pods of namespace A (its ``namespace``, carried from the custom resource); a service from a
file or URL (the node operator's) without ``namespace:`` may select pods of any namespace. The
rule is applied by the attachment itself (:class:`NamespacedPodAttachment`), so every re-apply
of the definitions keeps it.

Where a pod's network namespace comes from:

1. the CNI ADD (:meth:`PodController.pod_added`, called by ``CniServer`` while the sandbox is
   made, before any container runs): the pod is looked up in the watch of this Node's pods,
   retried for ``lookupWait`` (the watch may lag the kubelet, as Istio's ``getPodWithRetry``
   knows); if selected, its namespace is opened from the event's path and the attachment
   (rules and listener) is in place BEFORE the plugin gets its answer: the first packet is
   covered. A pod that cannot be decided (not in the cache: API server down or watch behind)
   raises, so the plugin fails the sandbox and kubelet retries: fail closed;
2. at start, and when labels or definitions change for a running pod: the ``/proc`` scan
   (:func:`enforcer.net.pods.find_pod_netns`, with its two guards: never the host's namespace,
   and the namespace must hold one of the pod's IPs).

At the first reconcile after start, the tables an earlier enforcer left in running pods that
nothing selects any more (labels or definitions changed while no enforcer ran) are removed
(:meth:`PodController._sweep`); else such a pod's ports would refuse for ever.

A served pod going away (``deletionTimestamp`` set, or finished) stays served, its rules in force:
its app may answer until its containers stop. Pod deleted (watch) or its sandbox torn down (CNI
DEL): ``remove_attachment(release=False)``, the namespace is going away. Labels no longer
selecting it: ``remove_attachment(release=True)``, its rules are removed. Labels changed but
still selected: the attachment is replaced (the table stays in force in between, so connections
are refused, never passed to the app).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from enforcer.config import definitions as definitions_mod
from enforcer.config import settings as settings_mod
from enforcer.config.kubernetes import OnPod, OnSynced, PodInfo, label_tags
from enforcer.net.pods import PodNetns, ScanResult, find_pod_netns
from enforcer.net.ruleset import RedirectError
from enforcer.run.attach import PodAttachment, Undo
from enforcer.run.cni import CniEvent

log = logging.getLogger(__name__)

TAG_PREFIX = "k8s:"
NAMESPACE_TAG = "k8s:namespace"
SERVICE_ACCOUNT_TAG = "k8s:serviceaccount"


def pod_tags(pod: PodInfo) -> frozenset[str]:
    """A pod's tags: its labels as ``key=value``, plus ``k8s:namespace=`` and ``k8s:serviceaccount=``."""
    tags = {t for t in label_tags(pod.labels) if not t.startswith(TAG_PREFIX)}
    tags.add(f"{NAMESPACE_TAG}={pod.namespace}")
    tags.add(f"{SERVICE_ACCOUNT_TAG}={pod.service_account}")
    return frozenset(tags)


def in_namespace(definitions: definitions_mod.Definitions, namespace: str) -> definitions_mod.Definitions:
    """The definitions a pod of ``namespace`` may be served: the services of that namespace, and
    those without one (the node operator's files)."""

    def allowed(svc: definitions_mod.Service) -> bool:
        return svc.namespace in ("", namespace)

    return dataclasses.replace(
        definitions,
        services=tuple(filter(allowed, definitions.services)),
        catalog=tuple(filter(allowed, definitions.catalog)),
    )


def services_for(pod: PodInfo, definitions: definitions_mod.Definitions) -> tuple[definitions_mod.Service, ...]:
    """The services ``pod`` is to be served (empty: leave it alone, or let it go)."""
    if pod.host_network or pod.deleting:
        return ()
    return in_namespace(definitions, pod.namespace).for_tags(pod_tags(pod))


@dataclass(eq=False)
class NamespacedPodAttachment(PodAttachment):
    """A :class:`PodAttachment` that only ever serves services its pod's namespace may have
    (:func:`in_namespace`), whatever definitions it is handed."""

    namespace: str = ""

    async def apply(self, definitions: definitions_mod.Definitions) -> Undo:
        return await super().apply(in_namespace(definitions, self.namespace))


class Enrolment(Protocol):
    """Where enrolled pods are served (the daemon: ``Daemon.add_attachment`` / ``remove_attachment``)."""

    async def add_attachment(self, attachment: PodAttachment) -> None:
        """Serve it: its rules and listener are in place when this returns; raises if not."""

    async def remove_attachment(self, attachment: PodAttachment, *, release: bool) -> None:
        """Stop serving it; ``release``: remove its rules (else keep them and just close)."""


class PodSource(Protocol):
    """The pods of this Node (``enforcer.config.kubernetes.NodePods``, or a fake)."""

    pods: dict[str, PodInfo]
    synced: bool
    current: bool

    def find(self, namespace: str, name: str, uid: str = "") -> PodInfo | None: ...

    async def watch(self, on_pod: OnPod, on_synced: OnSynced) -> None: ...


class PodUnknown(Exception):
    """A CNI ADD for a pod that cannot be decided: its sandbox must fail (kubelet retries)."""


OpenNetns = Callable[[str, str], PodNetns]
"""Hold the network namespace at a path for a pod UID."""
Scan = Callable[[Mapping[str, Iterable[str]]], ScanResult]
MakeAttachment = Callable[[PodNetns, PodInfo, frozenset[str]], PodAttachment]


def _open_netns(path: str, uid: str) -> PodNetns:
    return PodNetns.open(path, uid=uid)


@dataclass(eq=False)
class Enrolled:
    """A pod being served: its last known state, its attachment, the CNI sandbox it came from
    (``""`` when found by the scan) and whether its release still has to be retried."""

    pod: PodInfo
    attachment: PodAttachment
    sandbox: str = ""
    releasing: bool = False


@dataclass(eq=False)
class PodController:
    """Enrols the pods of this Node that the definitions select (see the module docstring).

    Also the CNI server's ``PodNetworkHandler`` (:meth:`pod_added`, :meth:`pod_deleted`)."""

    settings: settings_mod.Settings
    source: PodSource
    sink: Enrolment
    definitions: Callable[[], definitions_mod.Definitions | None]
    """The definitions in force (None before the first set: nothing is decided)."""
    lookup_wait: float = 5.0
    poll: float = 0.05
    open_netns: OpenNetns = _open_netns
    scan: Scan = find_pod_netns
    make_attachment: MakeAttachment | None = None
    enrolled: dict[str, Enrolled] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _swept: bool = False

    # -- wiring ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch this Node's pods forever, reconciling after each full list."""
        await self.source.watch(self._on_pod, self.reconcile)

    async def definitions_changed(self) -> None:
        """A new set of definitions is in force: enrol, release or re-tag every pod."""
        await self.reconcile()

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    def _attachment(self, netns: PodNetns, pod: PodInfo, tags: frozenset[str]) -> PodAttachment:
        if self.make_attachment is not None:
            return self.make_attachment(netns, pod, tags)
        kube = self.settings.model.kubernetes
        port = kube.pods.listenPort if kube is not None else None
        return NamespacedPodAttachment(netns, self.settings, tags=tags, port=port, name=f"pod {pod}",
                                       namespace=pod.namespace, probes=pod.probes, pod_ips=pod.ips,
                                       probe_port=kube.pods.probePort if kube is not None else None)

    # -- the CNI plugin's events ----------------------------------------------------------------

    async def pod_added(self, event: CniEvent) -> None:
        """A sandbox exists, no container runs: enrol the pod before returning if it is selected;
        raise when that cannot be decided or done (the plugin fails the sandbox: fail closed)."""
        ref = event.pod
        pod = await self._lookup(ref.namespace, ref.name, ref.uid)
        if event.ips:
            pod = dataclasses.replace(pod, ips=tuple(str(i.ip) for i in event.ips))
        definitions = self.definitions()
        if definitions is None:
            raise PodUnknown(f"pod {pod}: no definitions in force yet")
        async with self._lock(pod.uid):
            wanted = services_for(pod, definitions)
            current = self.enrolled.get(pod.uid)
            if not wanted:
                if current is not None:  # a new sandbox for a pod no longer selected
                    await self._drop(current, release=True, why="a new sandbox, no longer selected")
                log.debug("pod %s: no service selects it; not enrolled", pod)
                return
            if event.netns is None:
                raise PodUnknown(f"pod {pod}: the CNI ADD names no network namespace")
            netns = self.open_netns(str(event.netns), pod.uid)
            if current is not None:
                if current.attachment.netns.inode == netns.inode and not current.attachment.netns.closed:
                    netns.close()  # kubelet retried the ADD: already served
                    current.sandbox = event.container_id
                    return
                await self._drop(current, release=False, why="its sandbox was re-created")
            await self._enrol(pod, netns, sandbox=event.container_id, how="CNI ADD")

    async def pod_deleted(self, event: CniEvent) -> None:
        """A sandbox is torn down: close every handle into its namespace (its rules go with it)."""
        ref = event.pod
        current = self.enrolled.get(ref.uid) if ref.uid else next(
            (e for e in self.enrolled.values() if (e.pod.namespace, e.pod.name) == (ref.namespace, ref.name)), None
        )
        if current is None:
            return
        async with self._lock(current.pod.uid):
            if current.sandbox and current.sandbox != event.container_id:
                return  # the DEL of an older sandbox of the same pod
            if self.enrolled.get(current.pod.uid) is current:
                await self._drop(current, release=False, why="CNI DEL")

    async def _lookup(self, namespace: str, name: str, uid: str) -> PodInfo:
        """The pod from the watch cache, waiting up to ``lookup_wait`` for it to appear."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lookup_wait
        while True:
            pod = self.source.find(namespace, name, uid)
            if pod is not None and (not uid or pod.uid == uid):
                return pod
            if loop.time() >= deadline:
                break
            await asyncio.sleep(self.poll)
        why = ("the API server cannot be reached" if not self.source.current
               else "it is not (yet) in the watch of this Node's pods")
        raise PodUnknown(
            f"pod {namespace}/{name} ({uid or 'no UID'}): cannot decide whether to protect it: {why} after "
            f"{self.lookup_wait:g}s; its sandbox fails (fail closed) and kubelet retries"
        )

    # -- the watch ------------------------------------------------------------------------------

    async def _on_pod(self, kind: str, pod: PodInfo) -> None:
        if kind == "DELETED":
            current = self.enrolled.get(pod.uid)
            if current is not None:
                async with self._lock(pod.uid):
                    if self.enrolled.get(pod.uid) is current:
                        await self._drop(current, release=False, why="pod deleted")
            self._locks.pop(pod.uid, None)
            return
        await self._evaluate(pod)

    async def reconcile(self) -> None:
        """Every pod against the definitions in force: pods gone are dropped, the rest evaluated;
        the namespaces of pods to enrol are found by one ``/proc`` scan."""
        for uid, current in list(self.enrolled.items()):
            if uid not in self.source.pods:
                async with self._lock(uid):
                    if self.enrolled.get(uid) is current:
                        await self._drop(current, release=False, why="no longer on this Node")
        definitions = self.definitions()
        if definitions is None:
            return
        pods = list(self.source.pods.values())
        to_find = {p.uid: p.ips for p in pods
                   if p.uid not in self.enrolled and p.ips and services_for(p, definitions)}
        found = (await asyncio.to_thread(self.scan, to_find)).found if to_find else {}
        try:
            for pod in pods:
                await self._evaluate(pod, found.pop(pod.uid, None))
        finally:
            for netns in found.values():
                netns.close()
        if not self._swept:
            self._swept = True
            await self._sweep(pods, definitions)

    async def _sweep(self, pods: Iterable[PodInfo], definitions: definitions_mod.Definitions) -> None:
        """Once, at the first reconcile: remove the tables an earlier enforcer left in pods that
        nothing selects any more (their labels or the definitions changed while no enforcer ran),
        which would otherwise refuse their ports for ever. A pod going away keeps its table (its
        app may answer until it stops); one found selected again meanwhile is left to its
        enrolment. One ``/proc`` scan for all of them."""
        stale = {p.uid: p.ips for p in pods if p.ips and p.uid not in self.enrolled and not p.host_network
                 and not p.deleting and not services_for(p, definitions)}  # fmt: skip
        if not stale:
            return
        found = (await asyncio.to_thread(self.scan, stale)).found
        for uid, netns in found.items():
            async with self._lock(uid):
                pod, now = self.source.pods.get(uid), self.definitions() or definitions
                if pod is None or uid in self.enrolled or pod.deleting or services_for(pod, now):
                    netns.close()
                    continue
                attachment = self._attachment(netns, pod, pod_tags(pod))
                try:
                    await attachment.release()  # removes the table if one is there, then closes
                except RedirectError as exc:
                    attachment.close()
                    log.error("pod %s: a table an earlier enforcer left cannot be removed: %s", pod, exc)

    async def _evaluate(self, pod: PodInfo, netns: PodNetns | None = None) -> None:
        """Enrol, release, re-tag or leave ``pod`` (``netns``: its namespace, found already)."""
        definitions = self.definitions()
        if definitions is None:
            if netns is not None:
                netns.close()
            return
        async with self._lock(pod.uid):
            try:
                await self._decide(pod, definitions, netns)
            except Exception:
                log.exception("pod %s: could not be enrolled or released; retried at the next change", pod)

    async def _decide(self, pod: PodInfo, definitions: definitions_mod.Definitions, netns: PodNetns | None) -> None:
        wanted = services_for(pod, definitions)
        current = self.enrolled.get(pod.uid)
        if current is not None:
            if netns is not None:
                netns.close()
            current.pod = dataclasses.replace(pod, ips=pod.ips or current.pod.ips)
            if pod.deleting and not current.releasing:
                return  # going away: its app may answer until it stops, so served until deleted or its CNI DEL
            if current.releasing or not wanted:
                await self._drop(current, release=True, why="no service selects it any more")
            elif pod_tags(pod) != current.attachment.tags:
                await self._retag(current, pod)
            return
        if not wanted:
            if netns is not None:
                netns.close()
            return
        if netns is None:
            if not pod.ips:
                return  # not started yet: its CNI ADD (or a later update with its IPs) enrols it
            result = await asyncio.to_thread(self.scan, {pod.uid: pod.ips})
            netns = result.found.pop(pod.uid, None)
            for other in result.found.values():
                other.close()
            if netns is None:
                log.warning("pod %s is selected but its network namespace was not found: %s", pod,
                            result.refused.get(pod.uid, "?"))
                return
        await self._enrol(pod, netns, sandbox="", how="/proc scan")

    # -- enrol and drop -------------------------------------------------------------------------

    async def _enrol(self, pod: PodInfo, netns: PodNetns, *, sandbox: str, how: str) -> None:
        tags = pod_tags(pod)
        try:
            attachment = self._attachment(netns, pod, tags)
        except BaseException:
            netns.close()
            raise
        try:
            await self.sink.add_attachment(attachment)
        except BaseException:
            attachment.close()
            raise
        self.enrolled[pod.uid] = Enrolled(pod, attachment, sandbox)
        log.info("pod %s enrolled (%s, net:[%d]): %s", pod, how, netns.inode,
                 ", ".join(s.name for s in attachment.services) or "no service")

    async def _drop(self, current: Enrolled, *, release: bool, why: str) -> None:
        """Stop serving a pod; with ``release`` its rules are removed (retried if refused)."""
        uid = current.pod.uid
        if current.releasing:
            try:
                await current.attachment.release()
            except RedirectError as exc:
                log.error("pod %s: its rules still cannot be removed: %s", current.pod, exc)
                return
        else:
            try:
                await self.sink.remove_attachment(current.attachment, release=release)
            except RedirectError as exc:
                current.releasing = True
                log.error("pod %s: not served any more, but its rules cannot be removed (retried): %s",
                          current.pod, exc)
                return
        self.enrolled.pop(uid, None)
        log.info("pod %s %s (%s)", current.pod, "released" if release else "let go", why)

    async def _retag(self, current: Enrolled, pod: PodInfo) -> None:
        """Its labels changed and it is still selected: serve it again with the new tags. The
        namespace is held across (a second descriptor) and its table stays in force meanwhile."""
        fresh = self.open_netns(current.attachment.netns.path, pod.uid)
        try:
            await self.sink.remove_attachment(current.attachment, release=False)
        except BaseException:
            fresh.close()
            raise
        self.enrolled.pop(pod.uid, None)
        await self._enrol(pod, fresh, sandbox=current.sandbox, how="labels changed")

