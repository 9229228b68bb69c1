"""Blob metadata and manifests on Postgres (`contracts.BundleCatalog`).

A manifest is checked against the blob rows it names, read `FOR SHARE` in
the same transaction, so the sizes it claims are the sizes stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from tether.common import errors, manifest
from tether.controller.storage import contracts

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool


class PostgresBundles:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def put_blob(self, *, digest: str, size: int) -> None:
        """Record a blob already verified and stored by the blob store."""
        manifest.check_digest(digest)
        async with self._pool.connection() as conn:
            await conn.execute(
                "INSERT INTO blobs (digest, size) VALUES (%s, %s) ON CONFLICT (digest) DO NOTHING", (digest, size)
            )

    async def blob_sizes(self, digests: Iterable[str]) -> dict[str, int]:
        wanted = list(dict.fromkeys(digests))
        if not wanted:
            return {}
        async with self._pool.connection() as conn:
            rows = await (
                await conn.execute("SELECT digest, size FROM blobs WHERE digest = ANY(%s)", (wanted,))
            ).fetchall()
        return {d: int(s) for d, s in rows}

    async def put_manifest(self, *, body: bytes, signature: bytes = b"", key_id: str = "") -> str:
        """Store a validated manifest whose blobs are all stored; return its digest.

        The digest is computed here from the bytes, never taken on trust. A
        manifest stored again with a non-empty signature takes that signature
        (re-signing with a new key); the content, its address, cannot change.
        """
        parsed = manifest.Manifest.from_bytes(body)
        digest = manifest.sha256_digest(body)
        async with self._pool.connection() as conn, conn.transaction():
            wanted = parsed.blob_digests()
            rows = await (
                await conn.execute("SELECT digest, size FROM blobs WHERE digest = ANY(%s) FOR SHARE", (wanted,))
            ).fetchall()
            sizes = {d: int(s) for d, s in rows}
            missing = [d for d in wanted if d not in sizes]
            if missing:
                raise errors.FailedPrecondition(
                    f"manifest references {len(missing)} blob(s) not uploaded yet, e.g. {missing[0]}"
                )
            for f in parsed.files:
                if sizes[f.sha256] != f.size:
                    raise errors.InvalidManifest(
                        f"files: {f.path} claims {f.size} bytes but blob {f.sha256} has {sizes[f.sha256]}"
                    )
            await conn.execute(
                "INSERT INTO manifests (digest, body, signature, key_id) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (digest) DO UPDATE SET signature = EXCLUDED.signature, key_id = EXCLUDED.key_id"
                " WHERE EXCLUDED.signature <> ''",
                (digest, body, signature, key_id),
            )
        return digest

    async def get_manifest(self, digest: str) -> contracts.StoredManifest | None:
        async with self._pool.connection() as conn:
            row = await (
                await conn.execute("SELECT digest, body, signature, key_id FROM manifests WHERE digest = %s", (digest,))
            ).fetchone()
        if row is None:
            return None
        return contracts.StoredManifest(digest=row[0], body=bytes(row[1]), signature=bytes(row[2]), key_id=row[3])
