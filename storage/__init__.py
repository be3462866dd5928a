"""chatd's source of truth: the `Store` interface (`storage.base`), its SQL
implementation (`storage.sql.SqlStore`) and the Alembic migrations (`storage.migrate`)."""
