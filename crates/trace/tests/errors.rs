//! Every kind of bad trace input gets `file:line: problem`, and reading stops.

use suanwang_trace::{ColumnMap, Format, read_all};

use crate::temp_file;

fn error(name: &str, text: &str, format: &Format) -> String {
    let path = temp_file(name, text);
    let message = read_all(&path, format).unwrap_err().to_string();
    let prefix = format!("{}:", path.display());
    assert!(message.starts_with(&prefix), "{message} does not name the file");
    message[prefix.len()..].to_string()
}

const ITP_HEADER: &str = "job_id,submission_time,duration,num_gpu\n";

#[test]
fn a_value_that_is_not_a_number() {
    let text = format!("{ITP_HEADER}a,0,100,1\nb,soon,100,1\n");
    assert_eq!(error("nan.csv", &text, &Format::Itp), "3: submit time: 'soon' is not a number of seconds");
}

#[test]
fn a_negative_duration() {
    let text = format!("{ITP_HEADER}a,0,-5,1\n");
    assert_eq!(error("negative.csv", &text, &Format::Itp), "2: duration: must be zero or more, got -5");
}

#[test]
fn zero_accelerators_or_zero_duration() {
    assert_eq!(error("zero-gpu.csv", &format!("{ITP_HEADER}a,0,5,0\n"), &Format::Itp), "2: gpus: must be at least 1");
    assert_eq!(
        error("zero-time.csv", &format!("{ITP_HEADER}a,0,0,1\n"), &Format::Itp),
        "2: duration: must be at least 1 second"
    );
    assert_eq!(
        error("fraction.csv", &format!("{ITP_HEADER}a,0,5,1.5\n"), &Format::Itp),
        "2: gpus: '1.5' is not a whole number of accelerators"
    );
    assert_eq!(
        error("huge.csv", &format!("{ITP_HEADER}a,0,5,999999\n"), &Format::Itp),
        "2: gpus: must be between 0 and 100000, got 999999"
    );
}

#[test]
fn a_row_with_the_wrong_number_of_fields() {
    let text = format!("{ITP_HEADER}a,0,100,1\nb,5,100\n");
    assert_eq!(error("short.csv", &text, &Format::Itp), "3: has 3 fields, the header has 4");
}

#[test]
fn a_header_without_a_needed_column() {
    let message = error("header.csv", "job,submitted,duration,num_gpu\n", &Format::Itp);
    assert_eq!(message, "1: header has no column 'submission_time' (columns: job, submitted, duration, num_gpu)");
    let format = Format::Csv(ColumnMap::parse("submit=t,duration=d,gpus=g,user=owner").unwrap());
    assert_eq!(error("generic.csv", "t,d,g\n", &format), "1: header has no column 'owner' (columns: t, d, g)");
}

#[test]
fn a_gavel_line_with_missing_fields_or_an_unknown_model() {
    assert!(
        error("short.trace", "ResNet-18 (batch size 16)\tcmd\t-n\t1\t100\n", &Format::Gavel)
            .starts_with("1: has 5 tab-separated fields")
    );
    assert_eq!(
        error("model.trace", "GPT-9 (batch size 1)\tcmd\t-n\t1\t100\t0.0\t1\n", &Format::Gavel),
        "1: job_type: unknown model family 'GPT-9 (batch size 1)'"
    );
}

#[test]
fn a_missing_file_names_the_file() {
    let message = read_all(std::path::Path::new("/nonexistent/trace.csv"), &Format::Itp).unwrap_err().to_string();
    assert!(message.starts_with("/nonexistent/trace.csv:0: cannot read:"), "{message}");
}

#[test]
fn an_unrecognisable_header_asks_for_the_format() {
    let path = temp_file("mystery.csv", "a,b,c\n1,2,3\n");
    let message = Format::detect(&path).unwrap_err().to_string();
    assert!(
        message.ends_with(
            ":1: cannot tell the trace format from the header; pass --trace-format (itp, openb, gavel, csv)"
        ),
        "{message}"
    );
}

#[test]
fn column_maps_and_format_names_are_checked() {
    assert_eq!(ColumnMap::parse("submit=a,duration=b").unwrap_err(), "--columns: missing gpus=COLUMN");
    assert_eq!(
        ColumnMap::parse("submit=a,duration=b,gpus=c,colour=d").unwrap_err(),
        "--columns: unknown key 'colour' (known: submit, duration, gpus, gpu_type, user, estimate)"
    );
    assert_eq!(ColumnMap::parse("submit=a,submit=b,duration=c,gpus=d").unwrap_err(), "--columns: submit given twice");
    assert_eq!(ColumnMap::parse("submit=a,duration,gpus=c").unwrap_err(), "--columns: 'duration' is not KEY=COLUMN");
    assert_eq!(
        Format::parse("slurm", None).unwrap_err(),
        "unknown trace format 'slurm' (known: itp, openb, gavel, csv)"
    );
    assert!(Format::parse("csv", None).unwrap_err().contains("needs --columns"));
    assert!(Format::parse("itp", Some("submit=a")).unwrap_err().contains("only applies to --trace-format csv"));
}
