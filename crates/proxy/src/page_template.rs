//! The part of Go's `html/template` that error pages use, so pages written for kamal-proxy
//! render the same here: text, field references (`{{ .Message }}`, HTML-escaped), `{{ if }}`
//! / `{{ else if }}` / `{{ else }}` / `{{ end }}`, `{{ with .Field }}` (with `{{ . }}`),
//! comments (`{{/* */}}`) and the `{{-` / `-}}` trim markers. Anything else is refused when
//! the page is loaded, naming its line, rather than shown as text to visitors.

use std::fmt::Write;

/// The values a page can refer to.
#[derive(Debug, Clone, Copy)]
pub struct PageData<'a> {
    pub message: &'a str,
    pub status: u16,
    pub status_text: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Message,
    Status,
    StatusText,
    /// `.` inside `{{ with }}`: the value `with` chose.
    Dot,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Text(String),
    Value(Field),
    If {
        condition: Field,
        then: Vec<Node>,
        otherwise: Vec<Node>,
    },
    With {
        value: Field,
        then: Vec<Node>,
        otherwise: Vec<Node>,
    },
}

/// A parsed page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTemplate(Vec<Node>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct TemplateError {
    pub line: usize,
    pub reason: String,
}

/// One `{{ ... }}` action or the text between two.
enum Token<'a> {
    Text(&'a str),
    Action { body: &'a str, line: usize },
}

fn tokenize(source: &str) -> Result<Vec<Token<'_>>, TemplateError> {
    let mut tokens = Vec::new();
    let mut rest = source;
    let line_at = |offset: usize| source[..offset].matches('\n').count() + 1;
    while let Some(open) = rest.find("{{") {
        let start = source.len() - rest.len() + open;
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| TemplateError {
            line: line_at(start),
            reason: "unclosed action".into(),
        })?;
        let mut text = &rest[..open];
        let mut body = &after[..close];
        if let Some(trimmed) = body
            .strip_prefix('-')
            .filter(|b| b.starts_with(char::is_whitespace))
        {
            text = text.trim_end();
            body = trimmed;
        }
        let mut trim_next = false;
        if let Some(trimmed) = body
            .strip_suffix('-')
            .filter(|b| b.ends_with(char::is_whitespace))
        {
            body = trimmed;
            trim_next = true;
        }
        tokens.push(Token::Text(text));
        tokens.push(Token::Action {
            body: body.trim(),
            line: line_at(start),
        });
        rest = &after[close + 2..];
        if trim_next {
            rest = rest.trim_start();
        }
    }
    tokens.push(Token::Text(rest));
    Ok(tokens)
}

fn field(name: &str, line: usize) -> Result<Field, TemplateError> {
    match name {
        ".Message" => Ok(Field::Message),
        ".Status" => Ok(Field::Status),
        ".StatusText" => Ok(Field::StatusText),
        "." => Ok(Field::Dot),
        other => Err(TemplateError {
            line,
            reason: format!(
                "{other:?} is not something an error page can show (use .Message, .Status or .StatusText)"
            ),
        }),
    }
}

/// How a block ended: `{{ end }}`, `{{ else }}`, `{{ else if X }}`, or the end of the page.
enum BlockEnd {
    End,
    Else,
    ElseIf(Field, usize),
    Eof,
}

fn parse_block<'a>(
    tokens: &mut std::iter::Peekable<std::vec::IntoIter<Token<'a>>>,
) -> Result<(Vec<Node>, BlockEnd, usize), TemplateError> {
    let mut nodes = Vec::new();
    while let Some(token) = tokens.next() {
        let (body, line) = match token {
            Token::Text(text) => {
                if !text.is_empty() {
                    nodes.push(Node::Text(text.to_string()));
                }
                continue;
            }
            Token::Action { body, line } => (body, line),
        };
        if body.starts_with("/*") && body.ends_with("*/") {
            continue;
        }
        let mut words = body.split_whitespace();
        let keyword = words.next().unwrap_or_default();
        let rest: Vec<&str> = words.collect();
        let one_field = |rest: &[&str]| -> Result<Field, TemplateError> {
            match rest {
                [name] => field(name, line),
                _ => Err(TemplateError {
                    line,
                    reason: format!("cannot evaluate {body:?}: only a field may follow"),
                }),
            }
        };
        match keyword {
            "end" if rest.is_empty() => return Ok((nodes, BlockEnd::End, line)),
            "else" if rest.is_empty() => return Ok((nodes, BlockEnd::Else, line)),
            "else" if rest.first() == Some(&"if") => {
                return Ok((nodes, BlockEnd::ElseIf(one_field(&rest[1..])?, line), line))
            }
            "if" | "with" => {
                let value = one_field(&rest)?;
                let (then, otherwise) = parse_branches(tokens, line)?;
                nodes.push(if keyword == "if" {
                    Node::If {
                        condition: value,
                        then,
                        otherwise,
                    }
                } else {
                    Node::With {
                        value,
                        then,
                        otherwise,
                    }
                });
            }
            name if name.starts_with('.') && rest.is_empty() => {
                nodes.push(Node::Value(field(name, line)?))
            }
            _ => {
                return Err(TemplateError {
                    line,
                    reason: format!("unsupported action {{{{ {body} }}}}"),
                })
            }
        }
    }
    Ok((nodes, BlockEnd::Eof, 0))
}

/// The `then` and `else` parts of an `if`/`with` opened on `line`, up to its `{{ end }}`.
fn parse_branches(
    tokens: &mut std::iter::Peekable<std::vec::IntoIter<Token<'_>>>,
    line: usize,
) -> Result<(Vec<Node>, Vec<Node>), TemplateError> {
    let (then, end, _) = parse_block(tokens)?;
    let otherwise = match end {
        BlockEnd::End => Vec::new(),
        BlockEnd::Else => match parse_block(tokens)? {
            (otherwise, BlockEnd::End, _) => otherwise,
            (_, _, at) => {
                return Err(TemplateError {
                    line: at.max(line),
                    reason: "expected {{ end }} after {{ else }}".into(),
                })
            }
        },
        // `{{ else if X }}` is an `if` nested in the else branch, sharing its `{{ end }}`.
        BlockEnd::ElseIf(condition, at) => {
            let (then, otherwise) = parse_branches(tokens, at)?;
            vec![Node::If {
                condition,
                then,
                otherwise,
            }]
        }
        BlockEnd::Eof => {
            return Err(TemplateError {
                line,
                reason: "{{ if }} or {{ with }} without {{ end }}".into(),
            })
        }
    };
    Ok((then, otherwise))
}

impl PageTemplate {
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let mut tokens = tokenize(source)?.into_iter().peekable();
        match parse_block(&mut tokens)? {
            (nodes, BlockEnd::Eof, _) => Ok(Self(nodes)),
            (_, BlockEnd::End, line) => Err(TemplateError {
                line,
                reason: "{{ end }} without {{ if }} or {{ with }}".into(),
            }),
            (_, BlockEnd::Else | BlockEnd::ElseIf(..), line) => Err(TemplateError {
                line,
                reason: "{{ else }} without {{ if }} or {{ with }}".into(),
            }),
        }
    }

    pub fn render(&self, data: &PageData<'_>) -> String {
        let mut out = String::new();
        render_nodes(&self.0, data, "", &mut out);
        out
    }
}

fn value_of(field: Field, data: &PageData<'_>, dot: &str) -> String {
    match field {
        Field::Message => data.message.to_string(),
        Field::Status => data.status.to_string(),
        Field::StatusText => data.status_text.to_string(),
        Field::Dot => dot.to_string(),
    }
}

fn render_nodes(nodes: &[Node], data: &PageData<'_>, dot: &str, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(text) => out.push_str(text),
            Node::Value(field) => escape_html_into(&value_of(*field, data, dot), out),
            Node::If {
                condition,
                then,
                otherwise,
            } => {
                let branch = if value_of(*condition, data, dot).is_empty() {
                    otherwise
                } else {
                    then
                };
                render_nodes(branch, data, dot, out);
            }
            Node::With {
                value,
                then,
                otherwise,
            } => {
                let value = value_of(*value, data, dot);
                if value.is_empty() {
                    render_nodes(otherwise, data, dot, out);
                } else {
                    render_nodes(then, data, &value, out);
                }
            }
        }
    }
}

/// HTML-escapes `text` as Go's `html/template` does for text in an element.
pub fn escape_html_into(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            '\0' => out.push('\u{FFFD}'),
            c => {
                let _ = out.write_char(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, message: &str) -> String {
        PageTemplate::parse(source).unwrap().render(&PageData {
            message,
            status: 503,
            status_text: "Service Unavailable",
        })
    }

    #[test]
    fn fields_are_escaped_and_conditions_choose_a_branch() {
        let page = "<h1>{{ .Status }}</h1>{{ if .Message }}<p>{{ .Message }}</p>{{ else }}<p>Back soon</p>{{ end }}";
        assert_eq!(render(page, "a <b>"), "<h1>503</h1><p>a &lt;b&gt;</p>");
        assert_eq!(render(page, ""), "<h1>503</h1><p>Back soon</p>");
    }

    #[test]
    fn else_if_with_comments_and_trim_markers() {
        let page = "{{/* a note */}}{{ if .Message -}}\n  M={{ .Message }}\n{{- else if .StatusText }}T={{ .StatusText }}{{ end }}";
        assert_eq!(render(page, "x"), "M=x");
        assert_eq!(render(page, ""), "T=Service Unavailable");
        assert_eq!(
            render(
                "{{ with .Message }}<i>{{ . }}</i>{{ else }}none{{ end }}",
                "hi"
            ),
            "<i>hi</i>"
        );
        assert_eq!(
            render("{{with .Message}}{{.}}{{else}}none{{end}}", ""),
            "none"
        );
    }

    #[test]
    fn what_cannot_be_evaluated_is_refused_with_its_line() {
        let error = |source: &str| PageTemplate::parse(source).unwrap_err();
        assert_eq!(error("ok\n{{ .Nope }}").line, 2);
        assert_eq!(error("a\nb\n{{ range .Message }}{{ end }}").line, 3);
        assert_eq!(error("{{ if .Message }}open").line, 1);
        assert_eq!(error("x\n{{ end }}").line, 2);
        assert_eq!(error("{{ .Message | html }}").line, 1);
        assert_eq!(error("{{ .Message ").line, 1);
    }
}
