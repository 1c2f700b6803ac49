// Places orders: each order row and its event are written in one
// transaction, the event with a plain INSERT into exactly's outbox table.
// `exactly relay` publishes every committed event, once, in order per
// customer; a rolled-back order leaves no event.
//
// Needs the PostgreSQL JDBC driver (Debian: apt-get install
// libpostgresql-jdbc-java) and Java 11 or later, which runs this file
// without a build step:
//
//	java -cp /usr/share/java/postgresql.jar OrderWriter.java \
//	    --dsn 'jdbc:postgresql://127.0.0.1:5432/test?user=postgres' --count 10 --decline-every 4
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.HashMap;
import java.util.Map;
import java.util.UUID;

public class OrderWriter {
    static class Declined extends Exception {
        Declined(String orderId) { super(orderId); }
    }

    /** A table name, schema-qualified or not, quoted. */
    static String table(String name) {
        StringBuilder b = new StringBuilder();
        for (String part : name.split("\\.")) {
            if (b.length() > 0) b.append('.');
            b.append('"').append(part.replace("\"", "\"\"")).append('"');
        }
        return b.toString();
    }

    static String json(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }

    /** Writes the order and its event in one transaction; on decline it is rolled back after both writes. */
    static boolean placeOrder(Connection conn, String outbox, String orders, String topic, String orderId, String customer,
                              int amount, String writer, int n, boolean decline) throws SQLException {
        conn.setAutoCommit(false);
        try {
            try (PreparedStatement ps = conn.prepareStatement(
                    "INSERT INTO " + table(orders) + " (id, customer, amount, writer, n) VALUES (?, ?, ?, ?, ?)")) {
                ps.setString(1, orderId);
                ps.setString(2, customer);
                ps.setInt(3, amount);
                ps.setString(4, writer);
                ps.setInt(5, n);
                ps.executeUpdate();
            }
            String event = "{\"order_id\":" + json(orderId) + ",\"customer\":" + json(customer) + ",\"amount\":" + amount
                    + ",\"writer\":" + json(writer) + ",\"n\":" + n + "}";
            // The outbox row: topic, key and payload (bytea) are all it needs;
            // id, key_hash and created_at are filled by the database. headers,
            // when given, is a JSON object of strings.
            try (PreparedStatement ps = conn.prepareStatement(
                    "INSERT INTO " + table(outbox) + " (topic, msg_key, payload, headers) VALUES (?, ?, ?, ?)")) {
                ps.setString(1, topic);
                ps.setString(2, customer);
                ps.setBytes(3, event.getBytes(StandardCharsets.UTF_8));
                ps.setString(4, "{\"content-type\":\"application/json\",\"writer\":" + json(writer) + "}");
                ps.executeUpdate();
            }
            if (decline) throw new Declined(orderId);
            conn.commit();
            return true;
        } catch (Declined d) {
            conn.rollback();
            return false;
        } catch (SQLException e) {
            conn.rollback();
            throw e;
        }
    }

    public static void main(String[] argv) throws Exception {
        Map<String, String> a = new HashMap<>(Map.of("--outbox", "exactly_outbox", "--orders", "orders", "--topic", "orders.created",
                "--writer", "java", "--customers", "alice,bob,carol", "--count", "10", "--decline-every", "0"));
        for (int i = 0; i + 1 < argv.length; i += 2) a.put(argv[i], argv[i + 1]);
        if (!a.containsKey("--dsn")) {
            System.err.println("usage: OrderWriter --dsn JDBC_URL [--outbox T] [--orders T] [--topic T] [--writer NAME] [--customers a,b] [--count N] [--decline-every N]");
            System.exit(2);
        }
        String[] customers = a.get("--customers").split(",");
        int count = Integer.parseInt(a.get("--count")), every = Integer.parseInt(a.get("--decline-every"));
        try (Connection conn = DriverManager.getConnection(a.get("--dsn"))) {
            try (Statement st = conn.createStatement()) {
                st.execute("CREATE TABLE IF NOT EXISTS " + table(a.get("--orders")) + " (id text PRIMARY KEY, "
                        + "customer text NOT NULL, amount integer NOT NULL, writer text NOT NULL, n integer NOT NULL)");
            }
            for (int n = 0; n < count; n++) {
                String orderId = UUID.randomUUID().toString();
                boolean decline = every > 0 && n % every == every - 1;
                boolean ok = placeOrder(conn, a.get("--outbox"), a.get("--orders"), a.get("--topic"), orderId,
                        customers[n % customers.length], 100 + n, a.get("--writer"), n, decline);
                System.out.println((ok ? "committed " : "rolled back ") + orderId);
                System.out.flush();
            }
        }
    }
}
