using System.Text;

namespace LoraKit.Templating;

internal enum TokKind { Text, VarStart, VarEnd, BlockStart, BlockEnd, Name, String, Int, Float, Op, End }

internal readonly record struct Tok(TokKind Kind, string Value, int Line);

/// <summary>
/// Splits a Jinja template into text and tag tokens, applying whitespace control the way transformers configures
/// Jinja for chat templates: <c>-</c> markers strip all adjacent whitespace, <c>trim_blocks</c> drops the newline
/// after a block tag and <c>lstrip_blocks</c> drops indentation before one.
/// </summary>
internal static class Lexer
{
    static readonly string[] Ops = ["**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">", "(", ")", "[", "]", "{", "}", ",", ".", ":", "|", "="];

    public static List<Tok> Tokenize(string src)
    {
        var raw = new List<(Tok tok, bool stripBefore, bool stripAfter, bool isBlock)>();
        int i = 0, line = 1;
        var text = new StringBuilder();
        void FlushText()
        {
            if (text.Length > 0) raw.Add((new Tok(TokKind.Text, text.ToString(), line), false, false, false));
            text.Clear();
        }
        while (i < src.Length)
        {
            if (src[i] == '{' && i + 1 < src.Length && (src[i + 1] == '{' || src[i + 1] == '%' || src[i + 1] == '#'))
            {
                char kind = src[i + 1];
                FlushText();
                int start = i;
                i += 2;
                bool stripBefore = i < src.Length && src[i] == '-';
                bool keepBefore = i < src.Length && src[i] == '+';
                if (stripBefore || keepBefore) i++;
                if (kind == '#')
                {
                    int endC = src.IndexOf("#}", i, StringComparison.Ordinal);
                    if (endC < 0) throw new TemplateException("unclosed comment", line);
                    bool sa = src[endC - 1] == '-';
                    line += Count(src, start, endC + 2);
                    i = endC + 2;
                    raw.Add((new Tok(TokKind.BlockStart, "#", line), stripBefore, sa, !keepBefore));
                    continue;
                }
                raw.Add((new Tok(kind == '{' ? TokKind.VarStart : TokKind.BlockStart, "", line), stripBefore, false, kind == '%' && !keepBefore));
                string close = kind == '{' ? "}}" : "%}";
                while (true)
                {
                    while (i < src.Length && char.IsWhiteSpace(src[i])) { if (src[i] == '\n') line++; i++; }
                    if (i >= src.Length) throw new TemplateException($"unclosed tag, expected '{close}'", line);
                    bool dashClose = src[i] == '-' && string.CompareOrdinal(src, i + 1, close, 0, 2) == 0;
                    bool plusClose = src[i] == '+' && string.CompareOrdinal(src, i + 1, close, 0, 2) == 0;
                    if (dashClose || plusClose || string.CompareOrdinal(src, i, close, 0, 2) == 0)
                    {
                        i += dashClose || plusClose ? 3 : 2;
                        raw.Add((new Tok(kind == '{' ? TokKind.VarEnd : TokKind.BlockEnd, "", line), false, dashClose, kind == '%'));
                        break;
                    }
                    raw.Add((ReadToken(src, ref i, line), false, false, false));
                }
                continue;
            }
            if (src[i] == '\n') line++;
            text.Append(src[i++]);
        }
        FlushText();
        return ApplyWhitespaceControl(raw);
    }

    static int Count(string s, int from, int to) { int n = 0; for (int k = from; k < to; k++) if (s[k] == '\n') n++; return n; }

    static List<Tok> ApplyWhitespaceControl(List<(Tok tok, bool stripBefore, bool stripAfter, bool isBlock)> raw)
    {
        var texts = raw.Select(r => r.tok.Kind == TokKind.Text ? r.tok.Value : null).ToArray();
        // Jinja's lexer: a text starts a line at the template start or after a block tag whose trim_blocks ate a newline.
        var lineStarting = new bool[raw.Count];
        if (raw.Count > 0) lineStarting[0] = true;
        for (int k = 0; k < raw.Count; k++)
        {
            var (tok, stripBefore, stripAfter, isBlock) = raw[k];
            bool opens = tok.Kind is TokKind.VarStart or TokKind.BlockStart;
            bool closes = tok.Kind is TokKind.VarEnd or TokKind.BlockEnd || (tok.Kind == TokKind.BlockStart && tok.Value == "#");
            if (opens && k > 0 && texts[k - 1] is string before)
            {
                if (stripBefore) texts[k - 1] = before.TrimEnd();
                else if (isBlock) texts[k - 1] = LStripBlock(before, lineStarting[k - 1]);
            }
            if (closes && k + 1 < raw.Count && texts[k + 1] is string after)
            {
                if (stripAfter) texts[k + 1] = after.TrimStart();
                else if (tok.Kind == TokKind.BlockEnd || tok.Value == "#")
                {
                    string trimmed = after.StartsWith("\r\n") ? after[2..] : after.StartsWith('\n') ? after[1..] : after; // trim_blocks
                    lineStarting[k + 1] = trimmed.Length != after.Length;
                    texts[k + 1] = trimmed;
                }
            }
        }
        var result = new List<Tok>();
        for (int k = 0; k < raw.Count; k++)
        {
            var t = raw[k].tok;
            if (t.Kind == TokKind.Text) { if (texts[k]!.Length > 0) result.Add(t with { Value = texts[k]! }); }
            else if (t.Kind == TokKind.BlockStart && t.Value == "#") continue; // comments vanish
            else result.Add(t);
        }
        result.Add(new Tok(TokKind.End, "", raw.Count > 0 ? raw[^1].tok.Line : 1));
        return result;
    }

    /// <summary>lstrip_blocks: remove spaces/tabs between the start of the line and a block tag.</summary>
    static string LStripBlock(string before, bool lineStarting)
    {
        int lineStart = before.LastIndexOf('\n') + 1;
        if (lineStart == 0 && !lineStarting) return before;
        for (int k = lineStart; k < before.Length; k++)
            if (!char.IsWhiteSpace(before[k])) return before;
        return before[..lineStart];
    }

    static Tok ReadToken(string s, ref int i, int line)
    {
        char c = s[i];
        if (char.IsLetter(c) || c == '_')
        {
            int st = i;
            while (i < s.Length && (char.IsLetterOrDigit(s[i]) || s[i] == '_')) i++;
            return new Tok(TokKind.Name, s[st..i], line);
        }
        if (char.IsDigit(c))
        {
            int st = i;
            while (i < s.Length && (char.IsDigit(s[i]) || s[i] == '_')) i++;
            bool isFloat = false;
            if (i + 1 < s.Length && s[i] == '.' && char.IsDigit(s[i + 1]))
            {
                isFloat = true; i++;
                while (i < s.Length && char.IsDigit(s[i])) i++;
            }
            return new Tok(isFloat ? TokKind.Float : TokKind.Int, s[st..i].Replace("_", ""), line);
        }
        if (c == '\'' || c == '"')
        {
            var sb = new StringBuilder();
            i++;
            while (i < s.Length && s[i] != c)
            {
                if (s[i] == '\\' && i + 1 < s.Length)
                {
                    i++;
                    sb.Append(s[i] switch { 'n' => '\n', 't' => '\t', 'r' => '\r', '0' => '\0', _ => s[i] });
                    i++;
                    continue;
                }
                sb.Append(s[i++]);
            }
            if (i >= s.Length) throw new TemplateException("unterminated string literal", line);
            i++;
            return new Tok(TokKind.String, sb.ToString(), line);
        }
        foreach (var op in Ops)
            if (string.CompareOrdinal(s, i, op, 0, op.Length) == 0) { i += op.Length; return new Tok(TokKind.Op, op, line); }
        throw new TemplateException(char.IsSurrogate(c) || char.IsControl(c)
            ? $"unexpected character U+{(char.IsHighSurrogate(c) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1]) ? char.ConvertToUtf32(c, s[i + 1]) : c):X4}"
            : $"unexpected character '{c}'", line);
    }
}

/// <summary>An error in a chat template; one line always (raise_exception's text may span lines: they are joined).</summary>
public sealed class TemplateException(string message, int line = 0)
    : LoraKitException((line > 0 ? $"chat template line {line}: {message}" : $"chat template: {message}").ReplaceLineEndings(" "));
