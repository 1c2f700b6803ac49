package sqldb

import (
	"context"
	"database/sql"
	"fmt"
	"reflect"

	"github.com/jackc/pgx/v5"
)

// Tx is the part of the caller's transaction the module writes in, for
// *sql.Tx and pgx.Tx alike.
type Tx interface {
	// Exec runs a statement and returns the number of rows it affected.
	Exec(ctx context.Context, q string, args ...any) (int64, error)
	// QueryStrings runs a query whose rows are one string column.
	QueryStrings(ctx context.Context, q string, args ...any) ([]string, error)
	// Pgx reports whether the transaction is a pgx.Tx, so PostgreSQL's.
	Pgx() bool
}

// NilTxError is CallerTx's error for a nil transaction. Type is "*sql.Tx"
// or "pgx.Tx" for a nil of that type (a typed nil pointer in a pgx.Tx
// included), "" for a nil interface.
type NilTxError struct{ Type string }

func (e *NilTxError) Error() string {
	if e.Type == "" {
		return "nil transaction"
	}
	return "nil " + e.Type
}

// TxTypeError is CallerTx's error for a value that is no transaction it
// knows.
type TxTypeError struct{ Tx any }

func (e *TxTypeError) Error() string {
	return fmt.Sprintf("unsupported transaction type %T: want pgx.Tx or *sql.Tx", e.Tx)
}

// CallerTx returns tx, the caller's own transaction (a pgx.Tx, including a
// *pgxpool.Tx, or a *sql.Tx), as a Tx. A nil one is a *NilTxError, any
// other value a *TxTypeError: the callers word them for their own API.
func CallerTx(tx any) (Tx, error) {
	switch t := tx.(type) {
	case *sql.Tx:
		if t == nil {
			return nil, &NilTxError{Type: "*sql.Tx"}
		}
		return SQLTx(t), nil
	case pgx.Tx:
		if t == nil || isNilPointer(t) {
			return nil, &NilTxError{Type: "pgx.Tx"}
		}
		return PgxTx(t), nil
	case nil:
		return nil, &NilTxError{}
	}
	return nil, &TxTypeError{Tx: tx}
}

// isNilPointer catches a typed nil (a nil *pgxpool.Tx in a pgx.Tx).
func isNilPointer(v any) bool {
	rv := reflect.ValueOf(v)
	return rv.Kind() == reflect.Pointer && rv.IsNil()
}

// SQLTx adapts a *sql.Tx.
func SQLTx(tx *sql.Tx) Tx { return sqlTx{tx} }

type sqlTx struct{ tx *sql.Tx }

func (t sqlTx) Pgx() bool { return false }

func (t sqlTx) Exec(ctx context.Context, q string, args ...any) (int64, error) {
	res, err := t.tx.ExecContext(ctx, q, args...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

func (t sqlTx) QueryStrings(ctx context.Context, q string, args ...any) ([]string, error) {
	rows, err := t.tx.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var v string
		if err := rows.Scan(&v); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// PgxTx adapts a pgx.Tx.
func PgxTx(tx pgx.Tx) Tx { return pgxTx{tx} }

type pgxTx struct{ tx pgx.Tx }

func (t pgxTx) Pgx() bool { return true }

func (t pgxTx) Exec(ctx context.Context, q string, args ...any) (int64, error) {
	tag, err := t.tx.Exec(ctx, q, args...)
	if err != nil {
		return 0, err
	}
	return tag.RowsAffected(), nil
}

func (t pgxTx) QueryStrings(ctx context.Context, q string, args ...any) ([]string, error) {
	rows, err := t.tx.Query(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}
