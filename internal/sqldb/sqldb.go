// Package sqldb is the one place that knows how the supported SQL dialects
// differ: placeholders, identifier quoting, the database clock, list
// arguments. Every query in the module is built with it.
package sqldb

import (
	"database/sql"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
)

// Dialect names a supported database.
type Dialect string

// The supported dialects.
const (
	Postgres Dialect = "postgres"
	MySQL    Dialect = "mysql" // MySQL 8 and MariaDB 10.6+
	SQLite   Dialect = "sqlite"
)

// ParseDialect accepts the dialect names and their common aliases.
func ParseDialect(name string) (Dialect, error) {
	switch strings.ToLower(strings.TrimSpace(name)) {
	case "postgres", "postgresql", "pg", "pgx":
		return Postgres, nil
	case "mysql", "mariadb":
		return MySQL, nil
	case "sqlite", "sqlite3":
		return SQLite, nil
	case "":
		return "", errors.New("no dialect given: want postgres, mysql or sqlite")
	}
	return "", fmt.Errorf("unknown dialect %q: want postgres, mysql (also for MariaDB) or sqlite", name)
}

// Quote quotes a validated identifier part.
func (d Dialect) Quote(part string) string {
	if d == MySQL {
		return "`" + part + "`"
	}
	return `"` + part + `"`
}

// NowMillis is an SQL expression for the database clock in Unix milliseconds.
// Leases use the database clock so that relays on hosts with skewed clocks
// agree on who holds what.
func (d Dialect) NowMillis() string {
	switch d {
	case Postgres:
		return "(extract(epoch from clock_timestamp())*1000)::bigint"
	case MySQL:
		return "CAST(UNIX_TIMESTAMP(NOW(3))*1000 AS SIGNED)"
	default:
		return "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
	}
}

var identPart = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// MaxIdentLen is the longest identifier part accepted: PostgreSQL truncates
// at 63 bytes and MySQL refuses more than 64.
const MaxIdentLen = 63

// Ident is a validated table name, optionally qualified by a schema.
type Ident struct {
	Schema string
	Name   string
}

// ParseIdent validates a table name such as "exactly_outbox" or
// "app.exactly_outbox". Only ASCII letters, digits and underscores are
// accepted, so a name can never smuggle SQL into a statement.
func ParseIdent(s string) (Ident, error) {
	parts := strings.Split(s, ".")
	if len(parts) > 2 {
		return Ident{}, fmt.Errorf("unsafe table name %q: at most one dot (schema.table)", s)
	}
	for _, p := range parts {
		if !identPart.MatchString(p) {
			return Ident{}, fmt.Errorf("unsafe table name %q: each part must match [A-Za-z_][A-Za-z0-9_]*", s)
		}
		if len(p) > MaxIdentLen-10 { // room for the suffixes of derived names
			return Ident{}, fmt.Errorf("table name %q: part %q is longer than %d characters", s, p, MaxIdentLen-10)
		}
	}
	if len(parts) == 2 {
		return Ident{Schema: parts[0], Name: parts[1]}, nil
	}
	return Ident{Name: parts[0]}, nil
}

// String is the name as the user wrote it.
func (i Ident) String() string {
	if i.Schema != "" {
		return i.Schema + "." + i.Name
	}
	return i.Name
}

// Quoted is the name quoted for d, schema included.
func (i Ident) Quoted(d Dialect) string {
	if i.Schema != "" {
		return d.Quote(i.Schema) + "." + d.Quote(i.Name)
	}
	return d.Quote(i.Name)
}

// Derived is a sibling name in the same schema: the table name plus suffix.
func (i Ident) Derived(suffix string) Ident {
	return Ident{Schema: i.Schema, Name: i.Name + suffix}
}

// Args collects query arguments and returns the placeholder for each, so a
// query is written left to right the same way for every dialect.
type Args struct {
	d    Dialect
	Vals []any
}

// NewArgs starts an argument list for d.
func NewArgs(d Dialect) *Args { return &Args{d: d} }

// Add appends v and returns its placeholder.
func (a *Args) Add(v any) string {
	a.Vals = append(a.Vals, v)
	if a.d == Postgres {
		return "$" + strconv.Itoa(len(a.Vals))
	}
	return "?"
}

// In renders "col IN (...)" (or NOT IN) for vals. On PostgreSQL it passes one
// array argument (col = ANY($n)), which keeps one prepared statement for any
// length; elsewhere it expands one placeholder per value. An empty list is
// false for IN and true for NOT IN.
func In[T int64 | string](a *Args, col string, vals []T, not bool) string {
	if len(vals) == 0 {
		if not {
			return "1=1"
		}
		return "1=0"
	}
	if a.d == Postgres {
		if not {
			return col + " <> ALL(" + a.Add(vals) + ")"
		}
		return col + " = ANY(" + a.Add(vals) + ")"
	}
	var b strings.Builder
	b.WriteString(col)
	if not {
		b.WriteString(" NOT")
	}
	b.WriteString(" IN (")
	for i, v := range vals {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(a.Add(v))
	}
	b.WriteByte(')')
	return b.String()
}

// Open turns the handles users pass into a *sql.DB: a *sql.DB as it is, a
// *pgxpool.Pool through pgx's stdlib adapter (which leaves connection
// management to the pool). Call done when finished with it: it releases the
// adapter and never closes the caller's pool or database.
func Open(db any) (_ *sql.DB, done func(), _ error) {
	switch v := db.(type) {
	case *sql.DB:
		if v == nil {
			return nil, nil, errors.New("nil *sql.DB")
		}
		return v, func() {}, nil
	case *pgxpool.Pool:
		if v == nil {
			return nil, nil, errors.New("nil *pgxpool.Pool")
		}
		sdb := stdlib.OpenDBFromPool(v)
		return sdb, func() { sdb.Close() }, nil
	case nil:
		return nil, nil, errors.New("nil database handle: want *sql.DB or *pgxpool.Pool")
	}
	return nil, nil, fmt.Errorf("unsupported database handle %T: want *sql.DB or *pgxpool.Pool", db)
}

// IsPgx reports whether db's connections come from pgx's stdlib driver, which
// is needed for array arguments and LISTEN on PostgreSQL.
func IsPgx(db *sql.DB) bool {
	_, ok := db.Driver().(*stdlib.Driver)
	return ok
}
