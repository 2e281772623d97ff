"""A faithful, in-process stand-in for the Hugging Face Hub, for tests, ``make demo`` and benchmarks.

The real ``huggingface_hub`` client talks to it over HTTP on 127.0.0.1 (pass ``endpoint=hub.url`` or set
``HF_ENDPOINT``) with ``HF_HUB_DISABLE_XET=1``: the double speaks git-LFS, never Xet. The protocol it implements
is the one written down in /work/shared/research/hub-test-server.md.

    from hubdouble import HubDouble, Fault
    with HubDouble() as hub:
        hub.add_user("alice", token="hf_alice", orgs={"acme": "write"})
        hub.create_repo("alice/base")
        hub.upload_folder("alice/base", "path/to/model", message="seed")
        hub.faults.add(Fault(method="PUT", path=r"^/__lfs/upload/", kind="status", status=503))

Internal URL layout (useful for ``Fault.path`` regexes and for reading ``hub.request_log``):
``/api/...`` (JSON API), ``/{repo}/resolve/{rev}/{path}`` (file reads), ``/{repo}.git/info/lfs/objects/batch``,
``/__lfs/upload/{type}/{repo}/{oid}`` (presigned LFS PUT), ``/__lfs/verify/...``, ``/__cdn/{sha256}/{name}``
(CDN origin, ``http://localhost:PORT``), ``/oauth/...`` and ``/.well-known/openid-configuration``.
"""

from .faults import Fault
from .hub import HubDouble
from .server import RequestRecord
from .storage import FileEntry, HubError
from .webhooks import Delivery, Webhook

__all__ = ["HubDouble", "Fault", "RequestRecord", "HubError", "FileEntry", "Delivery", "Webhook"]
