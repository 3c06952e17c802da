namespace LoraKit.Tests.Fuzz;

/// <summary>The fuzz contract itself must tell a clean error from a leaked one, or every fuzz test could pass vacuously.</summary>
public class FuzzContractTests
{
    static void ThrowOurs() => throw new LoraKitException("config.json: field 'rope_theta' must be > 0, got -1");

    [Fact]
    public void CleanErrorsPassAndLeakedOnesFail()
    {
        Assert.Null(FuzzContract.Judge(null));
        Assert.Null(FuzzContract.Judge(Catch(ThrowOurs)));
        Assert.NotNull(FuzzContract.Judge(Catch(() => _ = ((string?)null)!.Length)));                 // NullReference
        Assert.NotNull(FuzzContract.Judge(Catch(() => { var a = new int[1]; _ = a[a.Length + 1]; })));                            // IndexOutOfRange
        Assert.NotNull(FuzzContract.Judge(Catch(() => _ = int.Parse("x"))));                          // BCL FormatException
        Assert.NotNull(FuzzContract.Judge(Catch(() => _ = new Dictionary<string, int>()["k"])));      // BCL KeyNotFound
        Assert.NotNull(FuzzContract.Judge(new LoraKitException("two\nlines")));
        Assert.NotNull(FuzzContract.Judge(new LoraKitException("x: The JSON value could not be converted. Path: $.a | LineNumber: 0")));
        Assert.NotNull(FuzzContract.JudgeMessage(""));
    }

    [Fact]
    public void CheckFailsOnAHang()
    {
        Assert.ThrowsAny<Xunit.Sdk.XunitException>(() =>
            FuzzContract.Check("contract", "hang", () => Thread.Sleep(5000), TimeSpan.FromMilliseconds(200)));
    }

    static Exception Catch(Action a)
    {
        try { a(); } catch (Exception e) { return e; }
        throw new InvalidOperationException("expected an exception");
    }
}
