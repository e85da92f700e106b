"""Importers: runs trained elsewhere, brought into a store as rows of the same tables (through
`Store.track`, so an import is resumable and idempotent like a tracked run)."""
