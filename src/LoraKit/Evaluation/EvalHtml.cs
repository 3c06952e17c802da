using System.Globalization;
using System.Text;
using static System.Net.WebUtility;

namespace LoraKit.Evaluation;

/// <summary>
/// eval.html: one self-contained page (inline CSS, no scripts, nothing fetched) with the scores of the base and each
/// adapter per kind and suite, each adapter's gate verdict and reasons, and the regressed and improved cases with the
/// outputs side by side, then every case. Outputs are model text, so everything is HTML-encoded.
/// </summary>
internal static class EvalHtml
{
    public static string Render(EvalReport r)
    {
        var sb = new StringBuilder();
        sb.Append("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>LoraKit evaluation</title><style>")
          .Append("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}")
          .Append("td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}th{background:#f4f4f4}")
          .Append(".pass{color:#186a1e;font-weight:600}.fail{color:#b3261e;font-weight:600}.skip{color:#777}pre{white-space:pre-wrap;margin:0;max-width:420px}")
          .Append("</style></head><body>");
        sb.Append($"<h1>LoraKit evaluation</h1><p>Base model <code>{HtmlEncode(r.Model)}</code> (fingerprint <code>{HtmlEncode(Models.BaseFingerprint.Short(r.BaseFingerprint))}</code>), ")
          .Append($"{r.Suites.Sum(s => s.Cases.Count)} cases in {r.Suites.Count} suite(s): {HtmlEncode(string.Join(", ", r.Suites.Select(s => s.Name)))}. ")
          .Append($"{HtmlEncode(r.Timestamp.ToString("u", CultureInfo.InvariantCulture))}, LoraKit {HtmlEncode(EvalReport.LoraKitVersion)}.</p>");
        Summary(sb, r);
        foreach (var (a, i) in r.Adapters.Select((a, i) => (a, i))) AdapterSection(sb, r, a, i);
        AllCases(sb, r);
        return sb.Append("</body></html>").ToString();
    }

    static void Summary(StringBuilder sb, EvalReport r)
    {
        sb.Append("<h2>Scores</h2><table><tr><th>model</th><th>task</th><th>capability</th><th>safety</th><th>perplexity</th><th>gate</th></tr>");
        Row(sb, "base", r.BaseScores, null);
        foreach (var a in r.Adapters) Row(sb, a.Adapter, a.Scores, a.Gate);
        sb.Append("</table>");
    }

    static void Row(StringBuilder sb, string name, Scores s, GateResult? gate)
    {
        sb.Append($"<tr><td><code>{HtmlEncode(name)}</code></td>");
        foreach (var k in new[] { CaseKind.Task, CaseKind.Capability, CaseKind.Safety })
        {
            var ks = s.Kinds[k];
            sb.Append(ks.PassRate is double p ? $"<td>{p * 100:0.#}% ({ks.Passed}/{ks.Total})</td>" : "<td class=\"skip\">–</td>");
        }
        sb.Append(s.Perplexity is double ppl ? $"<td>{ppl.ToString("0.###", CultureInfo.InvariantCulture)}</td>" : "<td class=\"skip\">–</td>");
        sb.Append(gate is null ? "<td></td>" : gate.Passed ? "<td class=\"pass\">passed</td>" : "<td class=\"fail\">failed</td>");
        sb.Append("</tr>");
    }

    static void AdapterSection(StringBuilder sb, EvalReport r, AdapterEval a, int index)
    {
        sb.Append($"<h2>Adapter <code>{HtmlEncode(a.Adapter)}</code></h2><p>sha256 <code>{HtmlEncode(a.Sha256)}</code>. Gate: ")
          .Append(a.Gate.Passed ? "<span class=\"pass\">passed</span>" : "<span class=\"fail\">failed</span>").Append("</p>");
        if (a.Gate.Reasons.Count > 0) sb.Append("<ul>").Append(string.Concat(a.Gate.Reasons.Select(x => $"<li>{HtmlEncode(x)}</li>"))).Append("</ul>");
        var baseByKey = r.BaseResults.ToDictionary(x => x.Key);
        foreach (var (title, list) in new[] { ("Regressed (passes on the base, fails with the adapter)", a.Comparison.Regressions), ("Improved", a.Comparison.Improvements) })
        {
            sb.Append($"<h3>{HtmlEncode(title)}: {list.Count}</h3>");
            if (list.Count == 0) continue;
            sb.Append("<table><tr><th>case</th><th>kind</th><th>base output</th><th>adapter output</th><th>why</th></tr>");
            foreach (var c in list)
                sb.Append($"<tr><td><code>{HtmlEncode(c.Key)}</code></td><td>{Scores.Name(c.Kind)}</td><td><pre>{HtmlEncode(baseByKey[c.Key].Output ?? "")}</pre></td>")
                  .Append($"<td><pre>{HtmlEncode(c.Output ?? "")}</pre></td><td>{HtmlEncode(c.Reason ?? baseByKey[c.Key].Reason ?? "")}</td></tr>");
            sb.Append("</table>");
        }
    }

    static void AllCases(StringBuilder sb, EvalReport r)
    {
        sb.Append("<h2>All cases</h2><table><tr><th>case</th><th>kind</th><th>expects</th><th>base</th>");
        foreach (var a in r.Adapters) sb.Append($"<th><code>{HtmlEncode(a.Adapter)}</code></th>");
        sb.Append("</tr>");
        var cases = r.CasesByKey();
        var byKey = r.Adapters.Select(a => a.Results.ToDictionary(x => x.Key)).ToList();
        foreach (var b in r.BaseResults)
        {
            sb.Append($"<tr><td><code>{HtmlEncode(b.Key)}</code></td><td>{Scores.Name(b.Kind)}</td><td>{HtmlEncode(cases[b.Key].Expect?.Describe() ?? "perplexity")}</td>");
            Cell(sb, b);
            foreach (var d in byKey) Cell(sb, d[b.Key]);
            sb.Append("</tr>");
        }
        sb.Append("</table>");
    }

    static void Cell(StringBuilder sb, CaseResult c)
    {
        string cls = c.Status switch { CaseStatus.Passed => "pass", CaseStatus.Failed => "fail", _ => "skip" };
        string label = c.Status == CaseStatus.Scored && c.Tokens > 0
            ? $"nll {(-c.LogLikelihood!.Value / c.Tokens!.Value).ToString("0.###", CultureInfo.InvariantCulture)}" : c.Status.ToString().ToLowerInvariant();
        sb.Append($"<td><span class=\"{cls}\">{HtmlEncode(label)}</span>");
        if (c.Output is not null) sb.Append($"<pre>{HtmlEncode(c.Output.Length > 400 ? c.Output[..400] + "…" : c.Output)}</pre>");
        if (c.Status == CaseStatus.Skipped && c.Reason is not null) sb.Append($"<div class=\"skip\">{HtmlEncode(c.Reason)}</div>");
        sb.Append("</td>");
    }
}
