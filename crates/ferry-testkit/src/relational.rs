//! The relational fixture shared by the end-to-end tests and the benchmark:
//! users → orders → line items, users → company, users ↔ tags, an order
//! count, a filter, a soft delete, a rename and a mapping override — and an
//! independent SQL query giving every expected document.

/// The fixture's tables with `users` users (a multiple of 30): a company
/// per 30 users, three orders and six line items per user, a tag per 15
/// users, and the user–tag pairs whose ids sum to a multiple of 7.
pub fn schema(users: u32) -> String {
    let (companies, tags) = ((users / 30).max(1), (users / 15).max(1));
    let (orders, items) = (users * 3, users * 6);
    format!("
CREATE TABLE companies (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, name text, company_id int REFERENCES companies,
                    deleted_at timestamptz);
CREATE TABLE orders (id int PRIMARY KEY, user_id int REFERENCES users, total numeric(10,2), status text NOT NULL,
                     created_at timestamptz DEFAULT now());
CREATE TABLE line_items (id int PRIMARY KEY, order_id int REFERENCES orders ON DELETE CASCADE, sku text, qty int);
CREATE TABLE tags (id int PRIMARY KEY, label text NOT NULL);
CREATE TABLE user_tags (user_id int REFERENCES users, tag_id int REFERENCES tags, PRIMARY KEY (user_id, tag_id));
INSERT INTO companies SELECT g, 'company ' || g FROM generate_series(1, {companies}) g;
INSERT INTO users SELECT g, 'u' || g || '@example.com', 'User ' || g, 1 + g % {companies}, NULL FROM generate_series(1, {users}) g;
INSERT INTO orders SELECT g, 1 + g % {users}, (g % 97) + 0.5, (ARRAY['new','paid','cancelled'])[1 + g % 3] FROM generate_series(1, {orders}) g;
INSERT INTO line_items SELECT g, 1 + g % {orders}, 'sku-' || (g % 50), 1 + g % 4 FROM generate_series(1, {items}) g;
INSERT INTO tags SELECT g, 'tag ' || g FROM generate_series(1, {tags}) g;
INSERT INTO user_tags SELECT u, t FROM generate_series(1, {users}) u, generate_series(1, {tags}) t WHERE (u + t) % 7 = 0;
")
}

/// The `[[index]]` body after `name` and `table = "users"`.
pub const INDEX: &str = r#"
columns = ["id", "email", "name", "company_id"]
soft_delete = "deleted_at"
rename = { name = "full_name" }
mapping = { email = { type = "keyword" } }

  [[index.has_many]]
  field = "orders"
  table = "orders"
  foreign_key = "user_id"
  columns = ["id", "total", "status"]
  order_by = "id"
  where = "status <> 'cancelled'"

    [[index.has_many.has_many]]
    field = "items"
    table = "line_items"
    foreign_key = "order_id"
    columns = ["id", "sku", "qty"]

  [[index.has_many]]
  field = "tags"
  table = "tags"
  foreign_key = "user_id"
  through = { table = "user_tags", other_key = "tag_id" }
  columns = ["id", "label"]
  mapping_type = "object"

  [[index.belongs_to]]
  field = "company"
  table = "companies"
  foreign_key = "company_id"
  columns = ["id", "name"]

  [[index.count]]
  field = "order_count"
  table = "orders"
  foreign_key = "user_id"
"#;

/// Every live user's expected document as (id text, JSON text), built with
/// jsonb functions, independently of ferry's queries. Callers may append
/// `AND …` conditions on `u`.
pub const EXPECTED: &str = "SELECT u.id::text, jsonb_build_object(
  'id', u.id, 'email', u.email, 'full_name', u.name, 'company_id', u.company_id,
  'orders', coalesce((SELECT jsonb_agg(jsonb_build_object('id', o.id, 'total', o.total, 'status', o.status,
        'items', coalesce((SELECT jsonb_agg(jsonb_build_object('id', li.id, 'sku', li.sku, 'qty', li.qty) ORDER BY li.id)
                           FROM line_items li WHERE li.order_id = o.id), '[]'::jsonb)) ORDER BY o.id)
     FROM orders o WHERE o.user_id = u.id AND o.status <> 'cancelled'), '[]'::jsonb),
  'tags', coalesce((SELECT jsonb_agg(jsonb_build_object('id', t.id, 'label', t.label) ORDER BY t.id)
     FROM tags t JOIN user_tags ut ON ut.tag_id = t.id WHERE ut.user_id = u.id), '[]'::jsonb),
  'company', (SELECT jsonb_build_object('id', c.id, 'name', c.name) FROM companies c WHERE c.id = u.company_id),
  'order_count', (SELECT count(*) FROM orders o WHERE o.user_id = u.id)
)::text FROM users u WHERE u.deleted_at IS NULL";
