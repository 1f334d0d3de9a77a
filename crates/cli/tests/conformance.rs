//! The OpenAPI document is the truth. The test reads `/openapi.json` from a
//! running server, generates requests for every operation from it — a valid
//! one built from each schema, and invalid ones by mutating every field
//! (removed, wrong type, null, past its bounds, control characters, unknown
//! fields, malformed bodies, bad path ids) — sends them with the right
//! kind of token (and without any), and checks every answer: never a 5xx,
//! always a status the document lists for that operation, and a JSON body
//! that matches the schema documented for that status.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use suanwang_api::client::Client;
use suanwang_api::{Job, LeaseResponse, TokenResponse};

use crate::platform::{Platform, job, submit};

/// The document, and schema lookups through `$ref`.
struct Doc(Value);

impl Doc {
    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.rsplit('/').next().unwrap();
                self.resolve(&self.0["components"]["schemas"][name])
            }
            None => schema,
        }
    }

    /// Checks `value` against `schema` (the subset of JSON Schema the
    /// document uses); the error names the path.
    fn check(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        for key in ["oneOf", "anyOf"] {
            if let Some(options) = schema.get(key).and_then(Value::as_array) {
                if options.iter().any(|o| self.check(o, value, at).is_ok()) {
                    return Ok(());
                }
                return Err(format!("{at}: {value} matches none of {key}"));
            }
        }
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for s in all {
                self.check(s, value, at)?;
            }
        }
        if let Some(types) = schema.get("type") {
            let types: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => vec![],
            };
            let ok = types.iter().any(|t| match *t {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "integer" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                "null" => value.is_null(),
                _ => true,
            });
            if !ok {
                return Err(format!("{at}: {value} is not of type {types:?}"));
            }
        }
        if let Some(options) = schema.get("enum").and_then(Value::as_array)
            && !value.is_null()
            && !options.contains(value)
        {
            return Err(format!("{at}: {value} is not one of {options:?}"));
        }
        if let Some(n) = value.as_f64() {
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && n < min
            {
                return Err(format!("{at}: {n} < minimum {min}"));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && n > max
            {
                return Err(format!("{at}: {n} > maximum {max}"));
            }
        }
        if let Value::Object(fields) = value {
            for name in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                let name = name.as_str().unwrap();
                if !fields.contains_key(name) {
                    return Err(format!("{at}: required field {name} missing"));
                }
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            for (name, v) in fields {
                match properties.and_then(|p| p.get(name)) {
                    Some(s) => self.check(s, v, &format!("{at}.{name}"))?,
                    None => match schema.get("additionalProperties") {
                        Some(Value::Bool(false)) => return Err(format!("{at}: unexpected field {name}")),
                        Some(s @ Value::Object(_)) => self.check(s, v, &format!("{at}.{name}"))?,
                        _ => {}
                    },
                }
            }
        }
        if let Value::Array(items) = value
            && let Some(item) = schema.get("items")
        {
            for (i, v) in items.iter().enumerate() {
                self.check(item, v, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }

    /// A valid instance of `schema`, preferring the realistic values in `known`.
    fn example(&self, schema: &Value, known: &BTreeMap<&str, Value>, name: &str) -> Value {
        if let Some(v) = known.get(name) {
            return v.clone();
        }
        let schema = self.resolve(schema);
        for key in ["oneOf", "anyOf"] {
            if let Some(options) = schema.get(key).and_then(Value::as_array) {
                let first = options.iter().find(|o| o.get("type") != Some(&json!("null"))).unwrap_or(&options[0]);
                return self.example(first, known, name);
            }
        }
        if let Some(options) = schema.get("enum").and_then(Value::as_array) {
            return options[0].clone();
        }
        let ty = match schema.get("type") {
            Some(Value::String(t)) => t.clone(),
            Some(Value::Array(ts)) => {
                ts.iter().filter_map(Value::as_str).find(|t| *t != "null").unwrap_or("null").into()
            }
            _ => "object".into(),
        };
        match ty.as_str() {
            "object" => {
                let mut out = serde_json::Map::new();
                for field in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                    let field = field.as_str().unwrap();
                    out.insert(field.into(), self.example(&schema["properties"][field], known, field));
                }
                // Optional fields with a realistic value are given too.
                for (field, _) in schema.get("properties").and_then(Value::as_object).into_iter().flatten() {
                    if let Some(v) = known.get(field.as_str()) {
                        out.entry(field.clone()).or_insert_with(|| v.clone());
                    }
                }
                Value::Object(out)
            }
            "array" => json!([self.example(&schema["items"], known, name)]),
            "integer" | "number" => schema.get("minimum").cloned().unwrap_or(json!(1)),
            "boolean" => json!(false),
            "string" => json!("x"),
            _ => Value::Null,
        }
    }

    /// Wrong values for one field of `schema`.
    fn mutations(&self, schema: &Value) -> Vec<(String, Value)> {
        let schema = self.resolve(schema);
        let mut out = vec![("null".to_string(), Value::Null), ("an object".into(), json!({"x": 1}))];
        let ty = format!("{}", schema.get("type").cloned().unwrap_or(Value::Null));
        if ty.contains("integer") || ty.contains("number") {
            out.push(("a string".into(), json!("12")));
            out.push(("a fraction".into(), json!(1.5)));
            out.push(("negative".into(), json!(-1)));
            out.push(("huge".into(), json!(u64::MAX)));
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                out.push(("over the maximum".into(), json!(max as u64 + 1)));
            }
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && min >= 1.0
            {
                out.push(("under the minimum".into(), json!(min as u64 - 1)));
            }
        } else if ty.contains("string") || schema.get("enum").is_some() {
            out.push(("a number".into(), json!(7)));
            out.push(("control characters".into(), json!("\u{1b}[31m\r\nred\u{0}")));
            out.push(("very long".into(), json!("z".repeat(100_000))));
            out.push(("not in the enum".into(), json!("no-such-value")));
        } else if ty.contains("array") {
            out.push(("a string".into(), json!("A100")));
            out.push(("empty".into(), json!([])));
            out.push(("wrong items".into(), json!([1, {"a": null}])));
        }
        out
    }
}

/// One answer checked against the operation's documented responses.
fn check_answer(doc: &Doc, op: &Value, what: &str, status: u16, content_type: &str, body: &str) -> Result<(), String> {
    if status >= 500 {
        return Err(format!("{what}: {status} {body}"));
    }
    let documented = &op["responses"][status.to_string()];
    if documented.is_null() {
        return Err(format!(
            "{what}: status {status} is not documented (documented: {:?}): {body}",
            op["responses"].as_object().map(|o| o.keys().collect::<Vec<_>>())
        ));
    }
    if content_type.starts_with("application/json")
        && let Some(schema) = documented["content"]["application/json"].get("schema")
    {
        let value: Value = serde_json::from_str(body).map_err(|e| format!("{what}: not JSON ({e}): {body}"))?;
        doc.check(schema, &value, "body").map_err(|e| format!("{what}: {status}: {e}"))?;
    }
    Ok(())
}

/// A request to send: what it tests, path and query, body, token.
type Case = (String, String, Option<Vec<u8>>, Option<String>);

struct Sender {
    agent: ureq::Agent,
    url: String,
}

impl Sender {
    /// Sends one request; returns status, content type and body.
    fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(String, String)],
        body: Option<&[u8]>,
    ) -> (u16, String, String) {
        let url = format!("{}{path}", self.url);
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            request = request.header("Authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            request = request.header(k, v);
        }
        let result = match body {
            Some(b) => {
                let request = request.header("Content-Type", "application/json").body(b.to_vec()).unwrap();
                self.agent.run(request)
            }
            None => self.agent.run(request.body(()).unwrap()),
        };
        let mut response = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        (status, content_type, text)
    }
}

#[test]
fn every_operation_answers_as_the_openapi_document_says() {
    let p = Platform::new("conformance");
    let consumer_client = p.org("acme", "a");
    let consumer = p.consumer_token("acme");
    let provider = std::fs::read_to_string(p.agent_token_file("a")).unwrap().trim().to_string();
    let operator = p.operator.clone();
    // Things for path parameters to point at: a running job's leased
    // attempt, a job that waits, a job to cancel, a token to revoke.
    let mut running = job("sleep 1");
    running.gpus = 1;
    submit(&consumer_client, &running);
    let leased = {
        // No agent runs here: the site comes up with this poll and gets the job.
        let agent = Client::new(&p.url, &provider);
        let mut lease = None;
        for _ in 0..50 {
            let r: LeaseResponse = agent.post("/v1/agent/lease", &json!({"wait_s": 1})).unwrap();
            if let Some(l) = r.lease {
                lease = Some(l);
                break;
            }
        }
        lease.expect("the job is leased")
    };
    let throwaway: TokenResponse = Client::new(&p.url, &operator)
        .post("/v1/tokens", &json!({"role": "consumer", "org": "acme", "label": "throwaway"}))
        .unwrap();
    // Site a has 7 accelerators left and b has no agent: these wait.
    let mut waiting = job("true");
    waiting.gpus = 8;
    let job_id = submit(&consumer_client, &waiting);
    let to_cancel = submit(&consumer_client, &waiting);
    let sender =
        // One pooled connection for every request, as a client would: the
        // server must keep it usable after every refusal.
        Sender { agent: ureq::Agent::config_builder().http_status_as_error(false).build().into(), url: p.url.clone() };
    let (_, _, text) = sender.send("GET", "/openapi.json", None, &[], None);
    let doc = Doc(serde_json::from_str(&text).unwrap());
    assert!(doc.0["components"]["securitySchemes"]["bearer"].is_object(), "a bearer security scheme");
    let known: BTreeMap<&str, Value> = [
        ("command", json!(["true"])),
        ("accelerators", json!(["A100"])),
        ("gpus", json!(1)),
        ("estimate_s", json!(60)),
        ("id", json!("acme-two")),
        ("kind", json!("enterprise")),
        ("role", json!("consumer")),
        ("org", json!("acme")),
        ("exit_code", json!(0)),
        ("end", json!("exited")),
        ("wall_s", json!(1)),
        ("wait_s", json!(0)),
    ]
    .into_iter()
    .collect();
    let mut failures = Vec::new();
    let mut sent = 0;
    let mut accepted = BTreeMap::new();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    // The attempt's end last: after it, the attempt's other reports are
    // refused (its output is no longer kept).
    let mut paths: Vec<(&String, &Value)> = doc.0["paths"].as_object().unwrap().iter().collect();
    paths.sort_by_key(|(template, _)| template.ends_with("/finish"));
    for (template, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let method = method.to_uppercase();
            let token = if template.starts_with("/v1/agent") {
                provider.clone()
            } else if template.starts_with("/v1/tokens") || template.starts_with("/v1/orgs") {
                operator.clone()
            } else {
                consumer.clone()
            };
            let mut headers = vec![];
            if template.contains("{attempt}") {
                headers.push(("X-Attempt-Secret".to_string(), leased.secret.clone()));
            }
            let fill = |job: &str, attempt: &str, id: &str| {
                template.replace("{job}", job).replace("{attempt}", attempt).replace("{id}", id)
            };
            let id = if template.starts_with("/v1/tokens") {
                throwaway.id.clone()
            } else if template.ends_with("/cancel") {
                to_cancel.to_string()
            } else {
                job_id.to_string()
            };
            let valid_path = fill(&leased.job.to_string(), &leased.attempt.to_string(), &id);
            let mut query = String::new();
            for param in op["parameters"].as_array().into_iter().flatten() {
                if param["in"] == "query" && param["required"] == true {
                    query.push_str(&format!(
                        "{}{}=0",
                        if query.is_empty() { "?" } else { "&" },
                        param["name"].as_str().unwrap()
                    ));
                }
            }
            let body_schema = op["requestBody"]["content"]["application/json"]["schema"].clone();
            let valid_body = (!body_schema.is_null()).then(|| doc.example(&body_schema, &known, ""));
            let raw_body = op["requestBody"]["content"].get("application/octet-stream").is_some();
            let mut cases: Vec<Case> = Vec::new();
            let body_of = |v: &Value| Some(serde_json::to_vec(v).unwrap());
            let valid = match (&valid_body, raw_body) {
                (Some(v), _) => body_of(v),
                (None, true) => Some(b"some output\n".to_vec()),
                (None, false) if method == "POST" => Some(b"{}".to_vec()),
                _ => None,
            };
            cases.push(("valid".into(), format!("{valid_path}{query}"), valid.clone(), Some(token.clone())));
            cases.push(("no token".into(), format!("{valid_path}{query}"), valid.clone(), None));
            cases.push(("a bad token".into(), format!("{valid_path}{query}"), valid.clone(), Some("sw_nope".into())));
            if template.contains('{') {
                for bad in ["abc", "-1", "99999999999999999999999", "0"] {
                    cases.push((
                        format!("path id {bad}"),
                        format!("{}{query}", fill(bad, bad, bad)),
                        valid.clone(),
                        Some(token.clone()),
                    ));
                }
            }
            if let Some(v) = &valid_body {
                let schema = doc.resolve(&body_schema);
                cases.push((
                    "malformed JSON".into(),
                    valid_path.clone(),
                    Some(b"{\"a\":".to_vec()),
                    Some(token.clone()),
                ));
                cases.push(("an array body".into(), valid_path.clone(), Some(b"[]".to_vec()), Some(token.clone())));
                let mut extra = v.clone();
                extra["no_such_field"] = json!(1);
                cases.push(("an unknown field".into(), valid_path.clone(), body_of(&extra), Some(token.clone())));
                for (field, field_schema) in schema["properties"].as_object().into_iter().flatten() {
                    let mut without = v.clone();
                    without.as_object_mut().unwrap().remove(field);
                    cases.push((
                        format!("without {field}"),
                        valid_path.clone(),
                        body_of(&without),
                        Some(token.clone()),
                    ));
                    for (how, wrong) in doc.mutations(field_schema) {
                        let mut mutated = v.clone();
                        mutated[field] = wrong;
                        cases.push((
                            format!("{field} {how}"),
                            valid_path.clone(),
                            body_of(&mutated),
                            Some(token.clone()),
                        ));
                    }
                }
            }
            for (what, path, body, token) in cases {
                let (status, content_type, text) =
                    sender.send(&method, &path, token.as_deref(), &headers, body.as_deref());
                sent += 1;
                *statuses.entry(status).or_insert(0usize) += 1;
                let what = format!("{method} {template} ({what})");
                if (200..300).contains(&status) {
                    *accepted.entry(format!("{method} {template}")).or_insert(0) += 1;
                }
                if let Err(e) = check_answer(&doc, op, &what, status, &content_type, &text) {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {sent} answers break the document:\n{}", failures.len(), failures.join("\n"));
    // The valid requests were really served: every operation accepted at least one.
    for (template, item) in doc.0["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let key = format!("{} {template}", method.to_uppercase());
            assert!(accepted.contains_key(&key), "{key} accepted none of its requests");
        }
    }
    let _: Job = consumer_client.get(&format!("/v1/jobs/{job_id}")).unwrap();
    assert!(sent > 400, "only {sent} requests");
    let refused: usize = statuses.iter().filter(|(s, _)| **s >= 400).map(|(_, n)| n).sum();
    assert!(refused > sent / 2, "most generated requests are invalid and refused: {statuses:?}");
    // The checker itself can fail: a wrong body, a missing field, an
    // out-of-range number, an undocumented status.
    let job_schema = json!({"$ref": "#/components/schemas/Job"});
    assert!(doc.check(&job_schema, &json!({"id": "one"}), "body").is_err());
    let mut good: Value =
        serde_json::to_value(consumer_client.get::<Job>(&format!("/v1/jobs/{job_id}")).unwrap()).unwrap();
    assert!(doc.check(&job_schema, &good, "body").is_ok());
    good["request"]["gpus"] = json!(100_001);
    assert!(doc.check(&job_schema, &good, "body").is_err());
    good["request"]["gpus"] = json!(1);
    good["state"] = json!("exploded");
    assert!(doc.check(&job_schema, &good, "body").is_err());
    let op = &doc.0["paths"]["/v1/jobs/{id}"]["get"];
    assert!(check_answer(&doc, op, "self-test", 418, "application/json", "{}").is_err());
    assert!(check_answer(&doc, op, "self-test", 503, "application/json", "{}").is_err());
    eprintln!("conformance: {sent} requests, statuses {statuses:?}");
}
