package sqldb

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"strings"
)

// Querier runs a query: a *sql.DB, *sql.Conn or *sql.Tx.
type Querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// Column is a column of a table as the database reports it.
type Column struct {
	Name string
	// Type is the database's name of the type, lower case: "bigint",
	// "character varying" (PostgreSQL), "varchar" (MySQL), "integer"
	// (SQLite's declared type).
	Type     string
	Nullable bool
	// HasDefault is true when an INSERT that leaves the column out gets a
	// value: a default, an identity or auto-increment column, a generated
	// column.
	HasDefault bool
}

// Columns returns the columns of table t in their order, or none when the
// table does not exist. It is the one place that reads a table's layout,
// for every dialect.
func Columns(ctx context.Context, q Querier, d Dialect, t Ident) ([]Column, error) {
	var query string
	var args []any
	switch d {
	case Postgres:
		// to_regclass resolves the name as the statements do (search_path
		// for an unqualified one) and is NULL for a missing table.
		query = `SELECT a.attname, format_type(a.atttypid, NULL), NOT a.attnotnull,
       a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> ''
FROM pg_attribute a
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum`
		args = []any{t.Quoted(d)}
	case MySQL:
		schema := "DATABASE()"
		args = nil
		if t.Schema != "" {
			schema = "?"
			args = append(args, t.Schema)
		}
		args = append(args, t.Name)
		query = `SELECT COLUMN_NAME, LOWER(DATA_TYPE), IS_NULLABLE = 'YES',
       (COLUMN_DEFAULT IS NOT NULL OR EXTRA LIKE '%auto_increment%' OR EXTRA LIKE '%GENERATED%')
FROM information_schema.COLUMNS
WHERE TABLE_SCHEMA = ` + schema + ` AND TABLE_NAME = ?
ORDER BY ORDINAL_POSITION`
	case SQLite:
		// An INTEGER PRIMARY KEY is the rowid: it is filled when left out.
		query = `SELECT name, lower(type), "notnull" = 0,
       (dflt_value IS NOT NULL OR (pk = 1 AND lower(type) = 'integer'))
FROM pragma_table_info(?)
ORDER BY cid`
		args = []any{t.Name}
	default:
		return nil, fmt.Errorf("unknown dialect %q", d)
	}
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Column
	for rows.Next() {
		var c Column
		if err := rows.Scan(&c.Name, &c.Type, &c.Nullable, &c.HasDefault); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// Kind is the family of values a column must hold.
type Kind int

// The kinds the stores use.
const (
	Int   Kind = iota // any integer type wide enough for what it holds
	Text              // character data (MySQL's VARBINARY is accepted too)
	Bytes             // binary data
)

func (k Kind) String() string {
	switch k {
	case Int:
		return "an integer"
	case Text:
		return "a text"
	}
	return "a binary"
}

// kindOf classifies a type name as Columns reports it. SQLite follows its
// type affinity rules, so any declared type has a kind.
func kindOf(d Dialect, typ string) (Kind, bool) {
	typ = strings.ToLower(typ)
	if d == SQLite {
		switch {
		case strings.Contains(typ, "int"):
			return Int, true
		case strings.Contains(typ, "char"), strings.Contains(typ, "clob"), strings.Contains(typ, "text"):
			return Text, true
		case typ == "", strings.Contains(typ, "blob"):
			return Bytes, true
		}
		return 0, false
	}
	switch typ {
	case "bigint", "integer", "int", "smallint", "tinyint", "mediumint":
		return Int, true
	case "character varying", "text", "varchar", "char", "character", "tinytext", "mediumtext", "longtext":
		return Text, true
	case "bytea", "varbinary", "binary", "blob", "tinyblob", "mediumblob", "longblob":
		return Bytes, true
	}
	return 0, false
}

// accepts reports whether a column of kind have can hold what want needs.
func accepts(d Dialect, want, have Kind) bool {
	switch {
	case want == have:
		return true
	case want == Text && have == Bytes:
		// MySQL's inbox keys are VARBINARY; SQLite's untyped columns hold text.
		return d != Postgres
	}
	return false
}

// Want is a column a store reads or writes.
type Want struct {
	Name string
	Kind Kind
}

// SchemaError says why a table cannot be used: it is missing, or lacks
// columns, or has columns of the wrong kind, or has a NOT NULL column
// without a default that the store's inserts would leave out.
type SchemaError struct {
	Table   string // as the user named it
	Missing bool   // the table does not exist
	Lacks   []string
	Wrong   []string // "payload is text, want a binary type"
	Extra   []string // NOT NULL columns without a default
}

func (e *SchemaError) Error() string {
	if e.Missing {
		return fmt.Sprintf("table %s does not exist", e.Table)
	}
	var parts []string
	if len(e.Lacks) > 0 {
		parts = append(parts, "missing columns "+strings.Join(e.Lacks, ", "))
	}
	if len(e.Wrong) > 0 {
		parts = append(parts, "wrong type: "+strings.Join(e.Wrong, "; "))
	}
	if len(e.Extra) > 0 {
		parts = append(parts, "NOT NULL without a default, which inserts would leave out: "+strings.Join(e.Extra, ", "))
	}
	return fmt.Sprintf("table %s does not have the expected columns: %s", e.Table, strings.Join(parts, "; "))
}

// CheckColumns reads the columns of t and compares them with want. It
// returns a *SchemaError when the table cannot be used, another error when
// the layout could not be read. inserted names the columns the store's
// inserts fill; any other NOT NULL column without a default is an error.
// With inserted nil, extra columns are not looked at.
func CheckColumns(ctx context.Context, q Querier, d Dialect, t Ident, want []Want, inserted []string) error {
	cols, err := Columns(ctx, q, d, t)
	if err != nil {
		return fmt.Errorf("reading the columns of %s: %w", t, err)
	}
	e := &SchemaError{Table: t.String()}
	if len(cols) == 0 {
		e.Missing = true
		return e
	}
	have := map[string]Column{}
	for _, c := range cols {
		have[strings.ToLower(c.Name)] = c
	}
	for _, w := range want {
		c, ok := have[w.Name]
		if !ok {
			e.Lacks = append(e.Lacks, w.Name)
			continue
		}
		if k, ok := kindOf(d, c.Type); !ok || !accepts(d, w.Kind, k) {
			e.Wrong = append(e.Wrong, fmt.Sprintf("%s is %s, want %s type", w.Name, c.Type, w.Kind))
		}
	}
	if inserted != nil {
		for _, c := range cols {
			if !c.Nullable && !c.HasDefault && !slices.Contains(inserted, strings.ToLower(c.Name)) {
				e.Extra = append(e.Extra, c.Name)
			}
		}
	}
	if len(e.Lacks)+len(e.Wrong)+len(e.Extra) > 0 {
		return e
	}
	return nil
}
